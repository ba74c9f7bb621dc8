"""Atomic file writes: a reader sees the old file or the new one, never a partial write."""

import contextlib
import os


@contextlib.contextmanager
def atomic_write(path, mode=0o644, binary=True):
    """Yields a file object for `path`'s temporary twin; on success it replaces `path` atomically.

    `mode` is set on the file from the start (0o600 for secrets, never readable by others in between).
    On any exception the temporary file is removed and `path` is left as it was.
    """
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
