"""TFF execution contexts for the binaries and tests, and clean shutdown of TFF's C++ workers.

TFF's local context runs its executor in a `worker_binary` child process that can outlive Python
(and hold an inherited stdout pipe open): `shutdown()` stops every such child of this process by PID.
"""

import psutil

WORKER_BINARY = "worker_binary"


def install_context(max_concurrent_computation_calls=-1):
    """Installs the default TFF execution context for a run: TFF's local C++ context."""
    import tensorflow_federated as tff
    tff.backends.native.set_sync_local_cpp_execution_context(
        max_concurrent_computation_calls=max_concurrent_computation_calls)


def worker_processes():
    """TFF worker processes started by this process (children at any depth)."""
    children = psutil.Process().children(recursive=True)
    return [p for p in children if _is_worker(p)]


def _is_worker(process):
    try:
        return any(WORKER_BINARY in part for part in process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop_processes(processes, timeout=10.0):
    """SIGTERM, then SIGKILL what is still running after `timeout` seconds."""
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def shutdown():
    """Stops the TFF workers this process started."""
    stop_processes(worker_processes())
