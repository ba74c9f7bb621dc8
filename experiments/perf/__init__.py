"""Speed and scale: step cost, DLG speed, the PyTorch comparison, start-up, population scale, workers."""
