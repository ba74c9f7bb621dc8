"""TFF execution contexts for the binaries and tests, and clean shutdown of TFF's C++ workers.

`install_context()` installs a local context: TFF's C++ executor in a `worker_binary` child process, as
TFF's own local C++ context runs it, but started so that it ends with this process, even when this
process is killed (TFF's own worker outlives a killed parent, holding its port and any inherited
stdout pipe). With `--workers=host:port,...` it installs a context that runs every computation on
those running TFF workers (`python -m tff_programs.worker`; see docs/workers.md). `shutdown()` stops
every worker_binary child of this process by PID and closes the connections to remote workers;
`ignore_tff_exit_noise()` hides the harmless error TFF prints at interpreter exit.
"""

import asyncio
import os
import subprocess
import sys
import time

from absl import flags
import psutil

from tff_programs import common

WORKER_BINARY = "worker_binary"
# TFF's own gRPC limits for its local worker (executor_stacks/executor_factory.py).
_GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
_GRPC_OPTIONS = [
    ("grpc.max_message_length", _GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE_BYTES),
]

_WORKERS = flags.DEFINE_list(
    "workers",
    [],
    "host:port of running TFF workers (`python -m tff_programs.worker --port=N`) that run the "
    "rounds; clients are split evenly between them. Empty: TFF's local C++ worker. The workers "
    "see client data and private client state: see docs/workers.md.",
)
_WORKER_TIMEOUT = flags.DEFINE_float(
    "worker_timeout", 30.0, "Seconds to wait for each --workers address to accept a connection."
)

_open_channels = []
_local_workers = []
# Run by the child of _ending_with_this_thread: SIGKILL when its parent thread ends (PR_SET_PDEATHSIG = 1),
# unless the parent died already; execve keeps the setting.
_SET_DEATH_SIGNAL_AND_EXEC = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class WorkerUnavailableError(RuntimeError):
    """A TFF worker did not accept a connection in time."""


def parse_address(address):
    """'host:port' (host may be a [bracketed] IPv6 literal) -> (host, port); ValueError if not."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port with a port in 1..65535")
    return host, int(port)


def _check_workers(addresses):
    try:
        for address in addresses:
            parse_address(address)
    except ValueError as e:
        raise flags.ValidationError(f"--workers: {e}") from None
    if len(set(addresses)) != len(addresses):
        raise flags.ValidationError("--workers lists an address twice")
    return True


flags.register_validator("workers", _check_workers)
flags.register_validator("worker_timeout", lambda seconds: seconds > 0, message="--worker_timeout must be > 0 seconds")


def install_context(max_concurrent_computation_calls=-1, workers=None, worker_timeout=None):
    """Installs the default TFF execution context for a run and returns it.

    `workers` (a list of host:port; default: the --workers flag) empty: a new LocalWorker (the previous one
    stops) with `max_concurrent_computation_calls`. One worker: a synchronous context on it. Several: TFF's
    mergeable-computation context, which splits the clients of each round evenly between them.
    An unreachable worker raises `WorkerUnavailableError` naming it; when the addresses come from
    the flags, it ends the program with that one error line instead.
    """
    import tensorflow_federated as tff

    from_flags = workers is None
    if from_flags:
        workers, worker_timeout = _flag_value(_WORKERS), _flag_value(_WORKER_TIMEOUT)
    if not workers:
        while _local_workers:
            _local_workers.pop().stop()
        worker = LocalWorker(max_concurrent_computation_calls)
        worker.stub()  # started now, from this thread: the worker ends when the thread that started it ends
        _local_workers.append(worker)
        context = tff.framework.SyncExecutionContext(**_context_args(worker.stub))
    else:
        try:
            context = _remote_context(workers, worker_timeout or _WORKER_TIMEOUT.default)
        except WorkerUnavailableError as e:
            if from_flags:
                common.fail(str(e))
            raise
    tff.framework.set_default_context(context)
    return context


class LocalWorker:
    """TFF's C++ worker as a child process on a free local port (restarted by `stub()` if it has stopped).

    On Linux the kernel sends it SIGKILL when the thread that started it ends (PR_SET_PDEATHSIG): with this
    process's end, however it ends, as `install_context()` starts it from the caller's thread.
    """

    def __init__(self, max_concurrent_computation_calls=-1, start_timeout=120.0):
        self.max_concurrent_computation_calls = max_concurrent_computation_calls
        self.start_timeout = start_timeout
        self.process = None
        self._stub = None

    def stub(self):
        """The gRPC stub of the running worker, started first if it is not running."""
        import portpicker  # with TFF's stack, as tensorflow_federated and grpc: the core's venv has neither
        import tensorflow_federated as tff

        if self.process is not None and self.process.poll() is None:
            return self._stub
        self.stop()
        port = portpicker.pick_unused_port()
        binary = os.path.join(os.path.dirname(tff.__file__), "data", WORKER_BINARY)
        self.process = subprocess.Popen(
            _ending_with_this_thread(
                [
                    binary,
                    f"--port={port}",
                    f"--max_concurrent_computation_calls={self.max_concurrent_computation_calls}",
                ]
            )
        )
        self._stub = tff.framework.RemoteExecutorGrpcStub(self._ready_channel(f"localhost:{port}"))
        return self._stub

    def _ready_channel(self, address):
        import grpc

        # Not closed at shutdown: closing races gRPC's connectivity-polling thread ("Channel closed!" traceback);
        # the channel ends with the worker and this process. One ready-future: a timed-out one stays subscribed.
        channel = grpc.insecure_channel(address, _GRPC_OPTIONS)
        ready = grpc.channel_ready_future(channel)
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                ready.result(timeout=1.0)
                return channel
            except grpc.FutureTimeoutError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    ready.cancel()
                    self.stop()
                    raise WorkerUnavailableError(
                        f"TFF's local worker on {address} did not start (exit code {self.process.returncode})"
                    ) from None

    def stop(self):
        """Stops the worker (SIGTERM, then SIGKILL) if it runs."""
        if self.process is not None and self.process.poll() is None:
            stop_processes([psutil.Process(self.process.pid)])
            self.process.wait()


def _ending_with_this_thread(argv):
    """`argv` run through a small Python that sets the parent-death signal and then execs it (same PID), on
    Linux; `argv` elsewhere. Unlike a Popen `preexec_fn`, it runs no Python between fork and exec in this
    process, whose TensorFlow and gRPC threads make that unsafe."""
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-I", "-c", _SET_DEATH_SIGNAL_AND_EXEC, str(os.getpid()), *argv]


def _flag_value(flag_holder):
    return flag_holder.value if flags.FLAGS.is_parsed() else flag_holder.default


def _remote_context(addresses, timeout):
    import tensorflow_federated as tff

    channels = [connect(address, timeout) for address in addresses]
    _open_channels.extend(channels)
    stubs = [tff.framework.RemoteExecutorGrpcStub(channel) for channel in channels]
    if len(stubs) == 1:
        return tff.framework.SyncExecutionContext(**_context_args(lambda: stubs[0]))
    async_contexts = [tff.framework.AsyncExecutionContext(**_context_args(lambda stub=stub: stub)) for stub in stubs]
    return _ordered_mergeable_context(async_contexts)


def connect(address, timeout):
    """An open gRPC channel to the TFF worker at `address`; WorkerUnavailableError after `timeout` s."""
    import grpc

    host, port = parse_address(address)
    channel = grpc.insecure_channel(f"{host}:{port}", _GRPC_OPTIONS)
    ready = grpc.channel_ready_future(channel)
    try:
        ready.result(timeout=timeout)
    except grpc.FutureTimeoutError:
        ready.cancel()  # unsubscribes it: gRPC's polling thread stops before the channel closes
        channel.close()
        raise WorkerUnavailableError(
            f"TFF worker {address} did not accept a connection within {timeout:g} s "
            f"(start it with `python -m tff_programs.worker --port={port}` on {host})"
        ) from None
    return channel


def _context_args(get_stub):
    """Executor, compiler and argument conversions of TFF's native C++ contexts, on the worker of `get_stub()`."""
    import tensorflow_federated as tff

    def executor_stack(cardinalities):
        # Computations without a CLIENTS-placed argument (e.g. `initialize`) get 0 clients, as in
        # TFF's local context.
        cardinalities.setdefault(tff.CLIENTS, 0)
        executor = tff.framework.RemoteExecutor(get_stub())
        executor.set_cardinalities(cardinalities)
        return executor

    return dict(
        executor_fn=tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=executor_stack),
        compiler_fn=tff.backends.native.desugar_and_transform_to_native,
        transform_args=tff.tensorflow.transform_args,
        transform_result=tff.tensorflow.transform_result,
    )


def _ordered_mergeable_context(async_contexts):
    """TFF's mergeable-computation context over `async_contexts`, returning clients in order.

    TFF 0.87 concatenates the subrounds' CLIENTS-placed results in the order the workers *finish*
    (`_invoke_after_merge_in_async_pool`), so with two workers client 0 could be handed client 2's
    private state. This runs the same steps but gathers the subrounds' results in client order.
    """
    import tensorflow_federated as tff
    from tensorflow_federated.python.core.impl.execution_contexts import mergeable_comp_execution_context as mergeable

    def all_equal(type_spec):
        return not isinstance(type_spec, tff.FederatedType) or type_spec.all_equal

    async def run(comp, arg):
        arg_list = arg.value() if arg is not None else [None] * len(async_contexts)
        merged, merge_context = await mergeable._invoke_merge_in_async_pool(  # pylint: disable=protected-access
            comp, arg_list, async_contexts
        )
        result_type = comp.after_merge.type_signature.result
        if tff.types.contains_only(result_type, all_equal):
            return await mergeable._compute_after_merged(comp, arg_list[0], merged, merge_context)  # pylint: disable=protected-access
        results = await asyncio.gather(
            *(
                mergeable._compute_after_merged(comp, part, merged, context)  # pylint: disable=protected-access
                for part, context in zip(arg_list, async_contexts)
            )
        )
        return mergeable._repackage_partitioned_values(list(results), result_type)  # pylint: disable=protected-access

    class OrderedMergeableContext(mergeable.MergeableCompExecutionContext):
        """`MergeableCompExecutionContext` whose CLIENTS-placed results keep client order."""

        def invoke(self, comp, arg=None):
            if not isinstance(comp, mergeable.MergeableCompForm):
                comp = self._compiler_pipeline.compile(comp)  # pylint: disable=protected-access
            if arg is not None:
                arg = mergeable.MergeableCompExecutionContextValue(
                    arg, comp.up_to_merge.type_signature.parameter, len(async_contexts)
                )
            result = self._async_runner.run_coro_and_return_result(run(comp, arg))  # pylint: disable=protected-access
            return tff.types.type_to_py_container(result, comp.after_merge.type_signature.result)

    return OrderedMergeableContext(async_contexts, compiler_fn=tff.backends.native.compile_to_mergeable_comp_form)


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


def ignore_tff_exit_noise():
    """Hides TFF 0.87's `ServiceManager.__del__` AttributeError printed at interpreter exit.

    It is harmless (the binaries stop their TFF workers with shutdown()) but would turn a one-line
    error into a traceback. Other unraisable exceptions are reported as before.
    """
    default_hook = sys.unraisablehook

    def hook(unraisable):
        if "ServiceManager.__del__" not in getattr(unraisable.object, "__qualname__", ""):
            default_hook(unraisable)

    sys.unraisablehook = hook


def shutdown():
    """Closes the connections to remote workers and stops the TFF workers this process started."""
    while _local_workers:
        _local_workers.pop().stop()
    while _open_channels:
        _open_channels.pop().close()
    stop_processes(worker_processes())
