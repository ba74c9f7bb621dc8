"""A TFF worker that fails mid-run: noticed within --worker_failure_timeout, named in one line, and either
survived (its clients run on the other workers; a worker that comes back is used again) or the run stops
and the same command resumes it; the trained result equals the local run's."""

import logging
import os
import signal
import time

import numpy as np
import portpicker
import psutil
import pytest
import tensorflow as tf

from tests.helpers import start_worker
from tff_programs import contexts
from tfkl import data
from tfkl.federated import program, run_dir
from tfkl.federated.config import Config, build_process

FAILURE_TIMEOUT = 8.0
ROUNDS = 3
CONFIG = Config(
    dataset="digits",
    input_shape=(8, 8, 1),
    num_clients=4,
    batch_size=32,
    learning_rate=0.05,
    key_dim=64,
    seed=2,
    seeded_keys=True,
)


class Workers:
    """TFF workers on 127.0.0.1 (`tff_programs.worker`), each at a fixed port, which a test can stop, hang
    and start again."""

    def __init__(self, log_dir, count):
        self.log_dir = log_dir
        self.ports = [portpicker.pick_unused_port() for _ in range(count)]
        self.addresses = [f"127.0.0.1:{port}" for port in self.ports]
        self.processes = [None] * count
        for index in range(count):
            self.start(index)

    def start(self, index):
        port = self.ports[index]
        self.processes[index] = start_worker(port, self.log_dir / f"{port}-{time.monotonic_ns()}.log")
        contexts.connect(self.addresses[index], timeout=60).close()

    def signal(self, index, signum):
        os.kill(self.processes[index].pid, signum)
        if signum == signal.SIGKILL:
            self.processes[index].wait()

    def stop_all(self):
        """SIGTERM (SIGKILL after 10 s); SIGKILL at once for a hung worker, which would not act on SIGTERM."""
        running = [psutil.Process(p.pid) for p in self.processes if p is not None and p.poll() is None]
        for process in running:
            if process.status() == psutil.STATUS_STOPPED:
                process.kill()
        contexts.stop_processes(running)


@pytest.fixture
def workers(tmp_path):
    started = Workers(tmp_path, 2)
    try:
        yield started
    finally:
        started.stop_all()  # first: shutdown() would SIGTERM a hung one too, and wait 10 s
        contexts.install_context(workers=[])
        contexts.shutdown()


@pytest.fixture(scope="module")
def local_result(tmp_path_factory):
    """The same training on TFF's local context (the reference)."""
    root = str(tmp_path_factory.mktemp("local") / "run")
    contexts.install_context(workers=[])
    try:
        _train(root)
    finally:
        contexts.shutdown()
    return _restore(root)


def _train(root, rounds=ROUNDS):
    return program.train(
        root, CONFIG, program.RunOptions(rounds=rounds, progress=False), dataset=data.load(CONFIG.dataset)
    )


def _restore(root):
    server_state, client_states, round_num = run_dir.restore(root, CONFIG, build_process(CONFIG))
    assert round_num == ROUNDS
    return server_state, client_states


def _assert_equal_states(got, want):
    for x, y in zip(tf.nest.flatten(got[0]), tf.nest.flatten(want[0])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    assert sorted(got[1]) == sorted(want[1])
    for client in want[1]:
        for x, y in zip(tf.nest.flatten(got[1][client]), tf.nest.flatten(want[1][client])):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=f"client {client}")


def _after_rounds(monkeypatch, actions):
    """Runs `actions[r]()` once round r's metrics are released (the round's computations are done)."""
    metrics_manager = run_dir.metrics_manager

    class Hooked:
        def __init__(self, inner):
            self._inner = inner

        async def release(self, value, key):
            await self._inner.release(value, key)
            if key in actions:
                actions[key]()

    monkeypatch.setattr(run_dir, "metrics_manager", lambda root: Hooked(metrics_manager(root)))


def _on_next_compute(monkeypatch, address, action):
    """Runs `action()` when the worker at `address` is next asked for a result (Compute), i.e. mid-call."""
    pending = []

    class Stub(contexts._WatchedStub):
        def compute(self, request):
            if self._watch.address == address and pending:
                pending.pop()()
            return super().compute(request)

    monkeypatch.setattr(contexts, "_WatchedStub", Stub)
    return lambda: pending.append(action)


def _install(workers, on_failure):
    contexts.install_context(
        workers=workers.addresses, worker_timeout=60, failure_timeout=FAILURE_TIMEOUT, on_failure=on_failure
    )


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_worker_failing_mid_round_is_named_and_its_clients_run_on_the_other(
    workers, local_result, tmp_path, monkeypatch, caplog, signum
):
    failed_at = []

    def fail_worker_1():
        failed_at.append(time.monotonic())
        workers.signal(1, signum)

    arm = _on_next_compute(monkeypatch, workers.addresses[1], fail_worker_1)
    _after_rounds(monkeypatch, {1: arm})  # worker 1 fails inside round 2
    _install(workers, "retry")
    root = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        _train(root)
        noticed_at = time.monotonic()

    failures = [r.getMessage() for r in caplog.records if "stopped answering" in r.getMessage()]
    assert failures == [
        f"TFF worker {workers.addresses[1]} stopped answering (no reply for {FAILURE_TIMEOUT:g} s); "
        f"its clients run again on {workers.addresses[0]}"
    ]
    assert len(failed_at) == 1
    assert noticed_at - failed_at[0] < FAILURE_TIMEOUT + 60  # the failure, two rounds on one worker
    _assert_equal_states(_restore(root), local_result)


def test_detection_is_bounded_by_the_failure_timeout(workers, tmp_path, monkeypatch, caplog):
    """A hung worker (SIGSTOP: its connections stay open, nothing answers) is declared failed
    `--worker_failure_timeout` after its last answered probe, i.e. between timeout - probe interval and
    timeout + one poll (0.5 s) after it hung; 1.5 s more are allowed for thread scheduling."""
    events = {}

    def hang_worker_1():
        events["hung"] = time.monotonic()
        workers.signal(1, signal.SIGSTOP)

    class Handler(logging.Handler):
        def emit(self, record):
            if "stopped answering" in record.getMessage():
                events.setdefault("noticed", time.monotonic())

    arm = _on_next_compute(monkeypatch, workers.addresses[1], hang_worker_1)
    arm()
    _install(workers, "retry")
    handler = Handler()
    logging.getLogger().addHandler(handler)
    try:
        _train(str(tmp_path / "run"), rounds=1)
    finally:
        logging.getLogger().removeHandler(handler)
    took = events["noticed"] - events["hung"]
    probe_interval = min(contexts._PROBE_INTERVAL_SECONDS, FAILURE_TIMEOUT / 4)
    assert FAILURE_TIMEOUT - probe_interval <= took <= FAILURE_TIMEOUT + contexts._POLL_SECONDS + 1.5


def test_a_worker_that_comes_back_is_used_again(workers, local_result, tmp_path, monkeypatch, caplog):
    computes = {address: 0 for address in workers.addresses}

    class Counting(contexts._WatchedStub):
        def compute(self, request):
            computes[self._watch.address] += 1
            return super().compute(request)

    def kill_worker_1():
        workers.signal(1, signal.SIGKILL)

    def restart_worker_1():
        computes[workers.addresses[1]] = 0
        workers.start(1)
        time.sleep(2 * min(contexts._PROBE_INTERVAL_SECONDS, FAILURE_TIMEOUT / 4))  # a probe is answered

    monkeypatch.setattr(contexts, "_WatchedStub", Counting)
    arm = _on_next_compute(monkeypatch, workers.addresses[1], kill_worker_1)
    hooks = {1: arm, 2: restart_worker_1}
    _after_rounds(monkeypatch, hooks)
    _install(workers, "retry")
    root = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        _train(root)
    messages = [r.getMessage() for r in caplog.records]
    assert f"TFF worker {workers.addresses[1]} answers again: in use from this call" in messages
    assert computes[workers.addresses[1]] > 0  # round 3 ran on the restarted worker
    _assert_equal_states(_restore(root), local_result)


def test_stop_ends_the_run_naming_the_worker_and_the_same_call_resumes(workers, local_result, tmp_path, monkeypatch):
    arm = _on_next_compute(monkeypatch, workers.addresses[0], lambda: workers.signal(0, signal.SIGKILL))
    _after_rounds(monkeypatch, {1: arm})
    _install(workers, "stop")
    root = str(tmp_path / "run")
    with pytest.raises(contexts.WorkerFailedError) as failure:
        _train(root)
    assert failure.value.address == workers.addresses[0]
    assert str(failure.value) == (
        f"TFF worker {workers.addresses[0]} stopped answering (no reply for {FAILURE_TIMEOUT:g} s); "
        "the run stops (--on_worker_failure=stop)"
    )
    assert run_dir.restore(root, CONFIG, build_process(CONFIG))[2] == 1  # round 1 is kept
    workers.start(0)
    _install(workers, "stop")
    _train(root)
    _assert_equal_states(_restore(root), local_result)


def test_no_worker_left_ends_the_call(workers, tmp_path, monkeypatch):
    def kill_both():
        workers.signal(0, signal.SIGKILL)
        workers.signal(1, signal.SIGKILL)

    arm = _on_next_compute(monkeypatch, workers.addresses[0], kill_both)
    arm()
    _install(workers, "retry")
    with pytest.raises(contexts.WorkerFailedError, match="no other worker is left"):
        _train(str(tmp_path / "run"), rounds=1)


@pytest.mark.slow
def test_train_binary_survives_a_killed_worker_or_stops_and_resumes(workers, tmp_path):
    """The operator's case: `tff_programs.train --workers=...` and a worker SIGKILLed after round 1."""
    from tests.test_federated_programs import TRAIN, error_lines, finish, run

    train = (*TRAIN, "--rounds=4", f"--worker_failure_timeout={FAILURE_TIMEOUT:g}")

    def train_until_round_1_then(root, *args, action):
        process = run("tff_programs.train", f"--root_dir={root}", *train, *args, log=f"{root}.log")
        metrics, deadline = os.path.join(root, "metrics.csv"), time.time() + 300
        while process.poll() is None and time.time() < deadline:
            if os.path.exists(metrics) and sum(1 for _ in open(metrics)) > 1:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before round 2"
        action()
        return finish(process)

    local = str(tmp_path / "local")
    assert finish(run("tff_programs.train", f"--root_dir={local}", *train, log=f"{local}.log")) == 0
    workers_flag = "--workers=" + ",".join(workers.addresses)

    retried = str(tmp_path / "retried")
    assert train_until_round_1_then(retried, workers_flag, action=lambda: workers.signal(1, signal.SIGKILL)) == 0
    failures = [line for line in error_lines(f"{retried}.log") if "stopped answering" in line]
    assert len(failures) == 1 and failures[0].endswith(
        f"TFF worker {workers.addresses[1]} stopped answering (no reply for {FAILURE_TIMEOUT:g} s); "
        f"its clients run again on {workers.addresses[0]}"
    )

    workers.start(1)
    stopped = str(tmp_path / "stopped")
    killed = train_until_round_1_then(
        stopped, workers_flag, "--on_worker_failure=stop", action=lambda: workers.signal(0, signal.SIGKILL)
    )
    assert killed == 1
    assert error_lines(f"{stopped}.log")[-1] == (
        f"error: TFF worker {workers.addresses[0]} stopped answering (no reply for {FAILURE_TIMEOUT:g} s); the run "
        "stops (--on_worker_failure=stop); with the worker running again (or left out of --workers), the same "
        "command resumes from the last complete round"
    )
    workers.start(0)
    resumed = run("tff_programs.train", f"--root_dir={stopped}", *train, workers_flag, log=f"{stopped}.resumed.log")
    assert finish(resumed) == 0

    config = run_dir.load_config(local)
    process = build_process(config)
    want = run_dir.restore(local, config, process)
    for root in (retried, stopped):
        got = run_dir.restore(root, config, process)
        assert got[2] == want[2] == 4
        _assert_equal_states(got[:2], want[:2])


class _FakeWorker:
    def __init__(self, address):
        self.address, self.live, self.failed_at, self.contexts = address, True, None, 0
        self.watch = type("Watch", (), {"last_answer": 0.0})()
        self.context = f"context of {address}"

    def new_context(self):
        self.contexts += 1


def test_worker_pool_runs_a_failed_workers_part_on_a_live_one_and_readmits_it(caplog):
    workers = [_FakeWorker(f"w{i}") for i in range(3)]
    pool = contexts._WorkerPool(workers, "retry")
    assert [pool.live_worker(part).address for part in range(3)] == ["w0", "w1", "w2"]
    with caplog.at_level(logging.WARNING):
        pool.fail(workers[1], contexts.WorkerFailedError("w1", "TFF worker w1 stopped answering"))
    assert "its clients run again on w0, w2" in caplog.text
    assert [pool.live_worker(part).address for part in range(3)] == ["w0", "w2", "w2"]
    pool.readmit()  # no probe answered since it failed
    assert not workers[1].live
    workers[1].watch.last_answer = workers[1].failed_at + 1
    pool.readmit()
    assert workers[1].live and workers[1].contexts == 1
    stopping = contexts._WorkerPool([_FakeWorker("w0")], "stop")
    with pytest.raises(contexts.WorkerFailedError, match="the run stops"):
        stopping.fail(stopping.workers[0], contexts.WorkerFailedError("w0", "lost"))
    last = contexts._WorkerPool([_FakeWorker("w0")], "retry")
    with pytest.raises(contexts.WorkerFailedError, match="no other worker is left"):
        last.fail(last.workers[0], contexts.WorkerFailedError("w0", "lost"))
