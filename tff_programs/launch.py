"""Start-up of the tfkl binaries: flags parsed before TensorFlow loads, then TensorFlow without the noise.

`run(main)` is `absl.app.run(main)` with a flags parser that answers --help (exit 0) and rejects a bad flag
(one `error:` line, exit 1) in well under a second, and only then imports TensorFlow, dropping the three
"Unable to register cuDNN/cuFFT/cuBLAS factory" errors that XLA prints at that import on every machine, GPU or
not; everything else TensorFlow writes to stderr passes through. The binaries import TensorFlow, TFF and the
library's TensorFlow modules inside main().
"""

import functools
import os
import re
import signal
import sys
import threading

from absl import app, flags

import tff_programs
from tff_programs import common

# XLA's CUDA plug-ins registering a second time when TensorFlow loads (TensorFlow 2.14, also without a GPU).
CUDA_FACTORY_NOISE = re.compile(
    rb"Unable to register cu(DNN|FFT|BLAS) factory: Attempting to register factory for plugin cu(DNN|FFT|BLAS) "
    rb"when one has already been registered\s*$"
)


def run(main):
    """Runs an absl binary's `main` after `parse_flags`, with TensorFlow imported by `import_tensorflow`;
    SIGINT (Ctrl-C) ends it as SIGTERM does, with one line."""
    signal.signal(signal.SIGINT, tff_programs.interrupted)
    app.run(main, flags_parser=_parse_flags_then_import_tensorflow)


def _parse_flags_then_import_tensorflow(argv):
    remaining = parse_flags(argv)
    import_tensorflow()
    return remaining


def parse_flags(argv):
    """absl's flag parsing, except that --help (--helpshort, --helpfull, --helpxml) exits 0, as asking for help
    is no error, and a bad flag, a flag validator's complaint or a positional argument ends the program with one
    `error:` line (instead of absl's two-line "FATAL Flags parsing error" or its usage text)."""
    try:
        argv = flags.FLAGS(argv)
    except SystemExit:  # while parsing, only absl's help flags exit, after printing the help
        sys.exit(0)
    except flags.Error as e:
        common.fail(e)
    if len(argv) > 1:
        common.fail(f"unexpected arguments: {' '.join(argv[1:])} (every option is a flag, --name=value; see --help)")
    return argv


def import_tensorflow():
    """Imports TensorFlow with file descriptor 2 filtered: the lines matching CUDA_FACTORY_NOISE are dropped,
    every other byte goes on to stderr as it comes."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    stderr_fd = os.dup(2)
    read_fd, write_fd = os.pipe()
    forwarder = threading.Thread(target=forward_lines, args=(read_fd, os.dup(stderr_fd)), daemon=True)
    forwarder.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    handler = signal.signal(signal.SIGINT, functools.partial(tff_programs.interrupted, stderr_fd=stderr_fd))
    try:
        import tensorflow  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, handler)
        sys.stderr.flush()
        os.dup2(stderr_fd, 2)  # closes the pipe's last write end: the forwarder reads to its end and stops
        os.close(stderr_fd)
        forwarder.join(timeout=10)


def forward_lines(read_fd, write_fd, noise=CUDA_FACTORY_NOISE):
    """Copies the lines read from `read_fd` to `write_fd`, except those matching `noise`; closes both at the end."""
    with os.fdopen(read_fd, "rb") as source, os.fdopen(write_fd, "wb", buffering=0) as sink:
        for line in iter(source.readline, b""):
            if not noise.search(line):
                sink.write(line)
