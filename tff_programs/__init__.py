"""The tfkl binaries (`python -m tff_programs.<name>`).

Run as a binary, the package takes Ctrl-C from its first import on: SIGINT ends the process with one line, as
it does once the binary runs (`launch.run`), instead of a KeyboardInterrupt traceback from the imports.
"""

import os
import signal
import sys


def interrupted(signum, frame, stderr_fd=2):
    """Ends the process at once, as SIGTERM or kill -9 would (every file a run writes is written atomically,
    so the same command resumes it from its last complete round), instead of unwinding TFF's threads. The line
    goes to `stderr_fd` (the terminal's, while launch.import_tensorflow filters file descriptor 2)."""
    del signum, frame
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, b"\n")  # ends a progress bar's line (stdout), so that the error line stands on its own
    os.write(stderr_fd, b"error: interrupted (SIGINT); run the same command again to resume\n")
    os._exit(130)


if sys.argv[:1] == ["-m"]:  # python -m tff_programs.<name>: Python sets argv[0] to "-m" while it imports the package
    signal.signal(signal.SIGINT, interrupted)
