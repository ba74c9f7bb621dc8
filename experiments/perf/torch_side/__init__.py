"""PyTorch-side scripts, run from the repository root as `.venv-torch/bin/python -m experiments.perf.torch_side.<name>`
in the separate .venv-torch (torch + numpy only); they import nothing but torch, numpy and each other (experiments/
__init__.py and perf/__init__.py import nothing), and tfkl never imports them."""
