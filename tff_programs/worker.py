"""Runs one TFF worker (TFF 0.87's C++ executor service) for `--workers=host:port,...`.

    python -m tff_programs.worker --port=18501

The worker replaces this Python process (same PID), so stop it with SIGTERM (`kill PID`); SIGINT is
ignored by workers started in the background by a non-interactive shell. It has NO authentication
and listens on every interface: keep it private (docs/workers.md).
"""

import importlib.util
import os
import socket
import sys

from absl import app, flags

from tff_programs import common, launch

_PORT = flags.DEFINE_integer("port", None, "TCP port to serve on (all interfaces).", required=True)
_MAX_CALLS = flags.DEFINE_integer(
    "max_concurrent_computation_calls",
    -1,
    "Limit on concurrent calls of one computation (e.g. clients trained at once); -1: none.",
)
_MAX_MESSAGE_MB = flags.DEFINE_integer(
    "grpc_max_message_length_megabytes", 10000, "Largest gRPC message the worker accepts, in MB (TFF's default)."
)

flags.register_validator(
    "port", lambda port: port is not None and 0 < port < 65536, message="--port must be in 1..65535"
)
flags.register_validator(
    "max_concurrent_computation_calls",
    lambda n: n == -1 or n > 0,
    message="--max_concurrent_computation_calls must be -1 or > 0",
)
flags.register_validator(
    "grpc_max_message_length_megabytes", lambda mb: mb > 0, message="--grpc_max_message_length_megabytes must be > 0"
)


def worker_binary():
    """Path of the C++ worker shipped in the tensorflow_federated package (found without importing it)."""
    spec = importlib.util.find_spec("tensorflow_federated")
    if spec is None:
        common.fail("tensorflow_federated is not installed in this Python (run `make venv`)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "worker_binary")
    if not os.access(path, os.X_OK):
        common.fail(f"no executable TFF worker at {path}")
    return path


def check_port_free(port):
    """Ends the program with one line if `port` is taken (the worker itself would only log it).

    SO_REUSEADDR, as the worker's own socket: connections a killed worker left in TIME_WAIT do not make the
    port taken (a worker restarted at once on its address starts), a listening socket still does."""
    family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("::" if family == socket.AF_INET6 else "", port))
        except OSError as e:
            common.fail(f"port {port} is not free: {e.strerror}")


def main(argv):
    binary = worker_binary()
    check_port_free(_PORT.value)
    print(
        f"TFF worker pid {os.getpid()} serving on [::]:{_PORT.value} (no authentication, all "
        "interfaces: keep it private, docs/workers.md); stop it with SIGTERM",
        file=sys.stderr,
        flush=True,
    )
    os.execv(
        binary,
        [
            binary,
            f"--port={_PORT.value}",
            f"--max_concurrent_computation_calls={_MAX_CALLS.value}",
            f"--grpc_max_message_length_megabytes={_MAX_MESSAGE_MB.value}",
        ],
    )


if __name__ == "__main__":
    app.run(main, flags_parser=launch.parse_flags)  # no TensorFlow: the worker replaces this process
