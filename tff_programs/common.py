"""Helpers shared by the tfkl binaries (their flag choices come from tfkl.models, tfkl.data and
tfkl.keylock, which define them)."""

import sys

from absl import flags


def fail(message):
    """Ends the program with one clear error line (exit code 1)."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(1)


def parse_flags(argv):
    """The binaries' flag parser (`app.run(main, flags_parser=common.parse_flags)`): a bad flag, a flag
    validator's complaint or a positional argument ends the program with one `error:` line, instead of
    absl's two-line "FATAL Flags parsing error" or its usage text."""
    try:
        argv = flags.FLAGS(argv)
    except flags.Error as e:
        fail(e)
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])} (every option is a flag, --name=value; see --help)")
    return argv


def load_dataset(name, data_dir=None):
    from tfkl import data

    try:
        return data.load(name, data_dir)
    except (data.DataUnavailableError, OSError, ValueError) as e:
        fail(str(e))
