"""PyTorch-side scripts, run from the repository root as `.venv-torch/bin/python -m benchmarks.torch_side.<name>`
in the separate .venv-torch (torch + numpy only); they import nothing but torch, numpy and each other (benchmarks/
__init__.py imports nothing), and tfkl never imports them."""
