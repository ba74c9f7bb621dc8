"""Helpers shared by the tfkl binaries (their flag choices come from tfkl.names, which loads without
TensorFlow)."""

import os
import sys
import tempfile

from absl import flags

# The runs tff_programs.demo trains under its --root_dir, each a training run's root dir.
DEMO_RUNS = ("fedkl", "fedavg-norm", "victim_fedkl", "victim_fedavg-norm")


def holds_demo_run(directory):
    """Whether `directory` holds the demo's runs (a training run's config.json in one of `DEMO_RUNS`)."""
    return any(os.path.isfile(os.path.join(directory, run, "config.json")) for run in DEMO_RUNS)


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


def unwritable(directory):
    """Why files cannot be written in `directory` (created later if missing), or None: its nearest existing
    ancestor is a file, or refuses a new file. Writes nothing that stays."""
    directory = os.path.abspath(directory)
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a directory"
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        return f"cannot write in {existing} ({e.strerror or e})" + (
            "" if existing == directory else f", so cannot create {directory}"
        )
    return None


def writable_dir_validator(flag):
    """A flag checker: the flag's directory (if given) can be written (see `unwritable`)."""

    def check(directory):
        problem = directory and unwritable(directory)
        if problem:
            raise flags.ValidationError(f"--{flag}: {problem}")
        return True

    return check
