"""Helpers the tests share."""

import gzip
import os
import signal

import numpy as np


def kill_group(process):
    """SIGKILLs a binary started with start_new_session=True and the TFF worker it started (same process
    group), by that group's id."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def write_idx(path, array):
    """Writes `array` as a gzipped IDX file of unsigned bytes (the format of MNIST and Fashion-MNIST)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
