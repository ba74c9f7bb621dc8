"""TFF execution contexts for the binaries and tests, and clean shutdown of TFF's C++ workers.

`install_context()` installs TFF's local C++ context, or, with `--workers=host:port,...`, a context
that runs every computation on those running TFF workers (`python -m tff_programs.worker`; see
docs/workers.md). TFF's local context runs its executor in a `worker_binary` child process that can
outlive Python (and hold an inherited stdout pipe open): `shutdown()` stops every such child of this
process by PID and closes the connections to remote workers; `ignore_tff_exit_noise()` hides the
harmless error TFF prints at interpreter exit.
"""

import asyncio
import signal
import sys
import threading

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

    `workers` (a list of host:port; default: the --workers flag) empty: TFF's local C++ context with
    `max_concurrent_computation_calls`. One worker: a synchronous context on it. Several: TFF's
    mergeable-computation context, which splits the clients of each round evenly between them.
    An unreachable worker raises `WorkerUnavailableError` naming it; when the addresses come from
    the flags, it ends the program with that one error line instead.
    """
    import tensorflow_federated as tff

    from_flags = workers is None
    if from_flags:
        workers, worker_timeout = _flag_value(_WORKERS), _flag_value(_WORKER_TIMEOUT)
    if not workers:
        _let_sigint_stop_local_workers()
        context = tff.backends.native.create_sync_local_cpp_execution_context(
            max_concurrent_computation_calls=max_concurrent_computation_calls
        )
    else:
        try:
            context = _remote_context(workers, worker_timeout or _WORKER_TIMEOUT.default)
        except WorkerUnavailableError as e:
            if from_flags:
                common.fail(str(e))
            raise
    tff.framework.set_default_context(context)
    return context


def _let_sigint_stop_local_workers():
    """TFF stops its local worker with SIGINT and then waits for it. A process that a non-interactive
    shell started in the background ignores SIGINT, and the worker would inherit that: the wait never
    ends. Children get the default for a signal that has a Python handler, so install Python's own."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _flag_value(flag_holder):
    return flag_holder.value if flags.FLAGS.is_parsed() else flag_holder.default


def _remote_context(addresses, timeout):
    import tensorflow_federated as tff

    channels = [connect(address, timeout) for address in addresses]
    _open_channels.extend(channels)
    if len(channels) == 1:
        return tff.framework.SyncExecutionContext(**_context_args(channels[0]))
    async_contexts = [tff.framework.AsyncExecutionContext(**_context_args(c)) for c in channels]
    return _ordered_mergeable_context(async_contexts)


def connect(address, timeout):
    """An open gRPC channel to the TFF worker at `address`; WorkerUnavailableError after `timeout` s."""
    import grpc

    host, port = parse_address(address)
    channel = grpc.insecure_channel(f"{host}:{port}", _GRPC_OPTIONS)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        channel.close()
        raise WorkerUnavailableError(
            f"TFF worker {address} did not accept a connection within {timeout:g} s "
            f"(start it with `python -m tff_programs.worker --port={port}` on {host})"
        ) from None
    return channel


def _context_args(channel):
    """Executor, compiler and argument conversions of TFF's native C++ contexts, on `channel`."""
    import tensorflow_federated as tff

    stub = tff.framework.RemoteExecutorGrpcStub(channel)

    def executor_stack(cardinalities):
        # Computations without a CLIENTS-placed argument (e.g. `initialize`) get 0 clients, as in
        # TFF's local context.
        cardinalities.setdefault(tff.CLIENTS, 0)
        executor = tff.framework.RemoteExecutor(stub)
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
    while _open_channels:
        _open_channels.pop().close()
    stop_processes(worker_processes())
