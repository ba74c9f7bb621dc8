"""Helpers the tests share."""

import os
import signal


def kill_group(process):
    """SIGKILLs a binary started with start_new_session=True and the TFF worker it started (same process
    group), by that group's id."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
