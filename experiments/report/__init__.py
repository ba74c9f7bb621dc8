"""The generated documents: results/README.md and the .md pages, docs/figures/*.png, docs/REPORT.md."""
