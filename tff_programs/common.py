"""Helpers shared by the tfkl binaries (their flag choices come from tfkl.names, which loads without
TensorFlow)."""

import sys

from absl import app


def check_no_positional_args(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def fail(message):
    """Ends the program with one clear error line."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def load_dataset(name, data_dir=None):
    from tfkl import data

    try:
        return data.load(name, data_dir)
    except (data.DataUnavailableError, OSError, ValueError) as e:
        fail(str(e))
