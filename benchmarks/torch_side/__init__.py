"""PyTorch-side scripts; they run in the separate .venv-torch (torch + numpy only), never imported by tfkl."""
