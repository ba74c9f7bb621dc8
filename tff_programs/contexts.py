"""TFF execution contexts for the binaries and tests, and clean shutdown of TFF's C++ workers.

`install_context()` installs a local context: TFF's C++ executor in a `worker_binary` child process, as
TFF's own local C++ context runs it, but started so that it ends with this process, even when this
process is killed (TFF's own worker outlives a killed parent, holding its port and any inherited
stdout pipe). With `--workers=host:port,...` it installs a context that runs every computation on
those running TFF workers (`python -m tff_programs.worker`; see docs/workers.md), noticing within
`--worker_failure_timeout` seconds a worker that stops answering and, by default, running its share of
the call again on the others. `shutdown()` stops every worker_binary child of this process by PID and
closes the connections to remote workers; `ignore_tff_exit_noise()` hides the harmless error TFF prints
at interpreter exit.
"""

import asyncio
import functools
import os
import subprocess
import sys
import threading
import time

from absl import flags, logging
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
# Remote workers: reconnect within a second of a worker's return (gRPC's default backoff grows to 2 minutes).
_REMOTE_GRPC_OPTIONS = _GRPC_OPTIONS + [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
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
_WORKER_FAILURE_TIMEOUT = flags.DEFINE_float(
    "worker_failure_timeout",
    60.0,
    "Seconds a --workers worker may leave its health probes unanswered (killed, hung or cut off) "
    "before it counts as failed.",
)
_ON_WORKER_FAILURE = flags.DEFINE_enum(
    "on_worker_failure",
    "retry",
    ["retry", "stop"],
    "When a --workers worker fails: retry = run its clients again on the remaining workers (N workers "
    "survive N-1 failures; a worker that comes back is used again); stop = end the run, which the same "
    "command resumes from the last complete round.",
)

# Health probes of remote workers: at most this far apart; calls check their worker's health this often.
_PROBE_INTERVAL_SECONDS = 5.0
_POLL_SECONDS = 0.5
_remote_workers = []
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


class WorkerFailedError(RuntimeError):
    """A TFF worker stopped answering during a run (and, with `on_failure="retry"`, no other is left)."""

    def __init__(self, address, message):
        super().__init__(message)
        self.address = address


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
flags.register_validator(
    "worker_failure_timeout", lambda seconds: seconds > 0, message="--worker_failure_timeout must be > 0 seconds"
)


def install_context(
    max_concurrent_computation_calls=-1, workers=None, worker_timeout=None, failure_timeout=None, on_failure=None
):
    """Installs the default TFF execution context for a run and returns it.

    `workers` (a list of host:port; default: the --workers flag, as are the other arguments) empty: a new
    LocalWorker (the previous one stops) with `max_concurrent_computation_calls`. Otherwise TFF's
    mergeable-computation context on them, which splits the clients of each call evenly between them and
    survives failed workers as `_failover_context` says (`failure_timeout`: seconds without an answer before
    a worker counts as failed; `on_failure`: "retry" or "stop"); `WorkerFailedError` when it cannot.
    An unreachable worker raises `WorkerUnavailableError` naming it; when the addresses come from
    the flags, it ends the program with that one error line instead.
    """
    import tensorflow_federated as tff

    from_flags = workers is None
    if from_flags:
        workers, worker_timeout = _flag_value(_WORKERS), _flag_value(_WORKER_TIMEOUT)
        failure_timeout, on_failure = _flag_value(_WORKER_FAILURE_TIMEOUT), _flag_value(_ON_WORKER_FAILURE)
    if not workers:
        while _local_workers:
            _local_workers.pop().stop()
        worker = LocalWorker(max_concurrent_computation_calls)
        worker.stub()  # started now, from this thread: the worker ends when the thread that started it ends
        _local_workers.append(worker)
        context = tff.framework.SyncExecutionContext(**_context_args(worker.stub))
    else:
        try:
            context = _remote_context(
                workers,
                worker_timeout or _WORKER_TIMEOUT.default,
                failure_timeout or _WORKER_FAILURE_TIMEOUT.default,
                on_failure or _ON_WORKER_FAILURE.default,
            )
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


def _remote_context(addresses, connect_timeout, failure_timeout, on_failure):
    workers = [_RemoteWorker(address, connect_timeout, failure_timeout) for address in addresses]
    _remote_workers.extend(workers)
    return _failover_context(workers, on_failure)


class WorkerWatch:
    """Health of one TFF worker: a probe (an empty Dispose RPC) every few seconds on a channel of its own.

    The worker counts as failed once no probe has been answered for `timeout` seconds: SIGKILLed, hung
    (SIGSTOP), or cut off from the network alike. Probing goes on after that, so a worker that comes back at
    the same address is seen answering again.
    """

    def __init__(self, address, timeout):
        import grpc
        from tensorflow_federated.proto.v0 import executor_pb2, executor_pb2_grpc

        self.address = address
        self.timeout = timeout
        self._interval = min(_PROBE_INTERVAL_SECONDS, timeout / 4)
        self._channel = grpc.insecure_channel(_target(address), _REMOTE_GRPC_OPTIONS)
        self._probe = functools.partial(
            executor_pb2_grpc.ExecutorGroupStub(self._channel).Dispose,
            executor_pb2.DisposeRequest(executor=executor_pb2.ExecutorId(id="tfkl-health-probe")),
            timeout=self._interval,
        )
        self.last_answer = time.monotonic()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch {address}", daemon=True)
        self._thread.start()

    def _run(self):
        import grpc

        while not self._closed.is_set():
            sent = time.monotonic()
            try:
                self._probe()
                self.last_answer = sent
            except (grpc.RpcError, ValueError):  # ValueError: the channel was closed by close()
                pass
            self._closed.wait(max(0.0, self._interval - (time.monotonic() - sent)))

    @property
    def failed(self):
        return time.monotonic() - self.last_answer > self.timeout

    def error(self):
        return WorkerFailedError(
            self.address, f"TFF worker {self.address} stopped answering (no reply for {self.timeout:g} s)"
        )

    def wait_for_answer(self, since):
        """Returns once a probe sent after `since` (time.monotonic()) was answered; WorkerFailedError if the
        worker fails first."""
        while self.last_answer <= since:
            if self.failed:
                raise self.error()
            time.sleep(_POLL_SECONDS)

    def close(self):
        self._closed.set()
        self._channel.close()  # ends a probe in flight
        self._thread.join()


class _WatchedStub:
    """TFF's executor stub for one worker (the methods of `RemoteExecutorGrpcStub`), whose calls end with
    WorkerFailedError once the worker's watch says it failed: TFF itself retries a call to a lost worker
    forever, and a hung worker's call never returns."""

    def __init__(self, channel, watch):
        from tensorflow_federated.proto.v0 import executor_pb2_grpc

        self._rpcs = executor_pb2_grpc.ExecutorGroupStub(channel)
        self._watch = watch

    def _call(self, rpc, request):
        import grpc
        from tensorflow_federated.python.core.impl.executors import executors_errors

        if self._watch.failed:
            raise self._watch.error()
        call = rpc.future(request)
        while True:
            try:
                return call.result(timeout=_POLL_SECONDS)
            except grpc.FutureTimeoutError:
                if self._watch.failed:
                    call.cancel()
                    raise self._watch.error() from None
            except grpc.RpcError as error:
                if error.code() not in executors_errors.get_grpc_retryable_error_codes():
                    raise
                # Lost connection: TFF retries the whole call once the worker answers again (e.g. restarted).
                self._watch.wait_for_answer(since=time.monotonic())
                raise executors_errors.RetryableGRPCError(error) from None

    def get_executor(self, request):
        return self._call(self._rpcs.GetExecutor, request)

    def create_value(self, request):
        return self._call(self._rpcs.CreateValue, request)

    def create_struct(self, request):
        return self._call(self._rpcs.CreateStruct, request)

    def create_call(self, request):
        return self._call(self._rpcs.CreateCall, request)

    def create_selection(self, request):
        return self._call(self._rpcs.CreateSelection, request)

    def compute(self, request):
        return self._call(self._rpcs.Compute, request)

    def dispose(self, request):
        return self._call(self._rpcs.Dispose, request)

    def dispose_executor(self, request):
        return self._call(self._rpcs.DisposeExecutor, request)


class _RemoteWorker:
    """One TFF worker: its channel, watch and TFF async execution context; `live` until it fails."""

    def __init__(self, address, connect_timeout, failure_timeout):
        self.address = address
        self.channel = connect(address, connect_timeout)
        self.watch = WorkerWatch(address, failure_timeout)
        self.new_context()
        self.live = True
        self.failed_at = None

    def new_context(self):
        """A TFF context of its own: executors created on a worker that has since restarted are gone."""
        import tensorflow_federated as tff

        stub = _WatchedStub(self.channel, self.watch)
        self.context = tff.framework.AsyncExecutionContext(**_context_args(lambda: stub))

    def close(self):
        self.watch.close()
        self.channel.close()


def _failover_context(workers, on_failure):
    """TFF's mergeable-computation context over `workers` (_RemoteWorker), which survives failed workers.

    Each call's clients are split into one part per worker (a contiguous block each), whatever the number
    of live workers, so a run's arithmetic does not depend on failures: the part of a failed worker runs
    again on a live one (`on_failure="retry"`), or the call ends with WorkerFailedError
    (`on_failure="stop"`, or no worker left). A failed worker that answers again is used from the next
    call. The partial results are merged in part order and the clients' results returned in client order
    (TFF 0.87's own context uses the order in which workers finish: with two workers client 0 could be
    handed client 2's private state; docs/workers.md).

    TFF 0.87 internals used (all here and in `_run_mergeable`): `MergeableCompExecutionContext`'s
    `_compiler_pipeline` and `_async_runner`, `MergeableCompExecutionContextValue` (splits an argument
    into parts) and `_repackage_partitioned_values` (joins the clients' results).
    """
    import tensorflow_federated as tff
    from tensorflow_federated.python.core.impl.execution_contexts import mergeable_comp_execution_context as mergeable

    pool = _WorkerPool(workers, on_failure)

    class FailoverMergeableContext(mergeable.MergeableCompExecutionContext):
        """`MergeableCompExecutionContext` that runs a failed worker's part on a live one, in client order."""

        def invoke(self, comp, arg=None):
            if not isinstance(comp, mergeable.MergeableCompForm):
                comp = self._compiler_pipeline.compile(comp)  # pylint: disable=protected-access
            pool.readmit()
            if arg is None:
                arg_list = [None] * len(workers)
            else:
                arg_list = mergeable.MergeableCompExecutionContextValue(
                    arg, comp.up_to_merge.type_signature.parameter, len(workers)
                ).value()
            result = self._async_runner.run_coro_and_return_result(_run_mergeable(pool, comp, arg_list))  # pylint: disable=protected-access
            return tff.types.type_to_py_container(result, comp.after_merge.type_signature.result)

    return FailoverMergeableContext(
        [worker.context for worker in workers], compiler_fn=tff.backends.native.compile_to_mergeable_comp_form
    )


class _WorkerPool:
    """The workers of a failover context: which one runs a part, and which have failed or come back."""

    def __init__(self, workers, on_failure):
        self.workers = workers
        self.on_failure = on_failure

    def live_worker(self, part):
        """The worker of `part`, or the live worker it falls to when its own has failed."""
        if self.workers[part].live:
            return self.workers[part]
        live = [worker for worker in self.workers if worker.live]
        return live[part % len(live)]

    def fail(self, worker, error):
        """Marks `worker` failed; WorkerFailedError when the run must stop (`on_failure="stop"`, or none left)."""
        if worker.live:
            worker.live, worker.failed_at = False, time.monotonic()
            left = [w.address for w in self.workers if w.live]
            if self.on_failure == "retry" and left:
                logging.warning("%s; its clients run again on %s", error, ", ".join(left))
        if self.on_failure == "stop":
            raise WorkerFailedError(worker.address, f"{error}; the run stops (--on_worker_failure=stop)")
        if not any(w.live for w in self.workers):
            raise WorkerFailedError(worker.address, f"{error}, and no other worker is left")

    def readmit(self):
        """Puts back in use the failed workers that have answered a probe since they failed."""
        for worker in self.workers:
            if not worker.live and worker.watch.last_answer > worker.failed_at:
                worker.live = True
                worker.new_context()
                logging.warning("TFF worker %s answers again: in use from this call", worker.address)

    async def run(self, part, invoke):
        """`await invoke(context)` on the live worker of `part`, again on another each time one fails."""
        while True:
            worker = self.live_worker(part)
            try:
                return await invoke(worker.context)
            except WorkerFailedError as error:
                self.fail(worker, error)


async def _gather(*calls):
    """asyncio.gather that cancels the other calls when one fails (as they would go on after it)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


async def _run_mergeable(pool, comp, arg_list):
    """A `MergeableCompForm` on `pool`: `up_to_merge` on each part, the partial results merged in part
    order, then `after_merge` (once, when its result is all-equal; else on each part, in client order)."""
    import tensorflow_federated as tff
    from tensorflow_federated.python.core.impl.execution_contexts import mergeable_comp_execution_context as mergeable

    partials = await _gather(
        *(pool.run(part, lambda context, x=x: context.invoke(comp.up_to_merge, x)) for part, x in enumerate(arg_list))
    )
    merged = partials[0]
    for partial in partials[1:]:
        merged = await pool.run(
            0, lambda context, a=merged, b=partial: context.invoke(comp.merge, tff.structure.Struct.unnamed(a, b))
        )

    def after_merge(part, x):
        arg = merged if x is None else tff.structure.Struct.unnamed(x, merged)
        return pool.run(part, lambda context: context.invoke(comp.after_merge, arg))

    result_type = comp.after_merge.type_signature.result
    if tff.types.contains_only(result_type, _all_equal):
        return await after_merge(0, arg_list[0])
    results = await _gather(*(after_merge(part, x) for part, x in enumerate(arg_list)))
    return mergeable._repackage_partitioned_values(list(results), result_type)  # pylint: disable=protected-access


def _all_equal(type_spec):
    import tensorflow_federated as tff

    return not isinstance(type_spec, tff.FederatedType) or type_spec.all_equal


def connect(address, timeout):
    """An open gRPC channel to the TFF worker at `address`; WorkerUnavailableError after `timeout` s."""
    import grpc

    channel = grpc.insecure_channel(_target(address), _REMOTE_GRPC_OPTIONS)
    ready = grpc.channel_ready_future(channel)
    try:
        ready.result(timeout=timeout)
    except grpc.FutureTimeoutError:
        ready.cancel()  # unsubscribes it: gRPC's polling thread stops before the channel closes
        channel.close()
        host, port = parse_address(address)
        raise WorkerUnavailableError(
            f"TFF worker {address} did not accept a connection within {timeout:g} s "
            f"(start it with `python -m tff_programs.worker --port={port}` on {host})"
        ) from None
    return channel


def _target(address):
    host, port = parse_address(address)
    return f"{host}:{port}"


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
    _close_remote_workers()
    stop_processes(worker_processes())


def _close_remote_workers():
    while _remote_workers:
        _remote_workers.pop().close()
