"""Helpers shared by the tfkl binaries (their flag choices come from tfkl.names, which loads without
TensorFlow)."""

import sys


def fail(message):
    """Ends the program with one clear error line (exit code 1)."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(1)


def load_dataset(name, data_dir=None):
    from tfkl import data

    try:
        return data.load(name, data_dir)
    except (data.DataUnavailableError, OSError, ValueError) as e:
        fail(str(e))
