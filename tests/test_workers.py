"""Remote TFF workers: --workers flag handling, tff_programs.worker, and rounds on two workers on
127.0.0.1 matching TFF's local context, with private client state kept per client."""

import subprocess
import sys

from absl import flags
import numpy as np
import portpicker
import psutil
import pytest

from tests.helpers import REPO, assert_same_fedkl_results, fedkl_rounds, start_worker
from tff_programs import contexts


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """Two workers on 127.0.0.1; stopped by PID (SIGTERM) at the end; the local context restored."""
    logs = tmp_path_factory.mktemp("workers")
    ports = [portpicker.pick_unused_port() for _ in range(2)]
    processes = [start_worker(port, logs / f"{port}.log") for port in ports]
    addresses = [f"127.0.0.1:{port}" for port in ports]
    try:
        for address in addresses:
            contexts.connect(address, timeout=60).close()
        yield addresses
    finally:
        contexts.install_context(workers=[])
        contexts.shutdown()
        contexts.stop_processes([psutil.Process(p.pid) for p in processes if p.poll() is None])
        assert all(p.poll() is not None for p in processes), "a worker survived SIGTERM/SIGKILL"


# --- flags and errors (no TFF computation) -------------------------------------------------------


def test_parse_address():
    assert contexts.parse_address("127.0.0.1:18501") == ("127.0.0.1", 18501)
    assert contexts.parse_address("[::1]:9") == ("[::1]", 9)
    for bad in ("localhost", "host:", ":80", "host:0", "host:70000", "host:http"):
        with pytest.raises(ValueError, match="host:port"):
            contexts.parse_address(bad)


def test_workers_flag_validators():
    fv = flags.FlagValues()
    for name in ("workers", "worker_timeout", "worker_failure_timeout", "on_worker_failure"):
        fv[name] = flags.FLAGS[name]
    fv(
        [
            "prog",
            "--workers=127.0.0.1:1,h:2",
            "--worker_timeout=5",
            "--worker_failure_timeout=9",
            "--on_worker_failure=stop",
        ]
    )
    assert fv.workers == ["127.0.0.1:1", "h:2"]
    assert (fv.worker_failure_timeout, fv.on_worker_failure) == (9.0, "stop")
    for argv, message in (
        (["--workers=h:1,nohost"], "'nohost' is not host:port"),
        (["--workers=h:1,h:1"], "lists an address twice"),
        (["--worker_timeout=0"], "must be > 0"),
        (["--worker_failure_timeout=-1"], "--worker_failure_timeout must be > 0"),
        (["--on_worker_failure=wait"], "value should be one of <retry|stop>"),
    ):
        with pytest.raises(flags.IllegalFlagValueError, match=message):
            fv(["prog", *argv])


def test_unreachable_worker_is_named_within_the_timeout():
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    with pytest.raises(contexts.WorkerUnavailableError, match=f"TFF worker {address} did not accept"):
        contexts.install_context(workers=[address], worker_timeout=0.5)


def test_local_worker_stops_when_the_run_was_started_with_sigint_ignored():
    """A shell starting a run in the background makes it ignore SIGINT, which TFF sends its local
    worker before waiting for it: the run must still stop the worker instead of waiting forever."""
    script = (
        "import gc\n"
        "import tensorflow as tf\n"
        "import tensorflow_federated as tff\n"
        "from tff_programs import contexts\n"
        "contexts.install_context()\n"
        "print(tff.tensorflow.computation(lambda: tf.constant(1))())\n"
        "contexts.install_context()  # drops the first context and its worker\n"
        "gc.collect()\n"
        "print('stopped')\n"
    )
    # The shell ignores SIGINT and execs the run, which inherits it; no preexec_fn, which would make this process
    # fork with gRPC's fork handlers (it aborted once, after the suite's in-process TFF contexts).
    process = subprocess.Popen(
        ["sh", "-c", 'trap "" INT; exec "$0" "$@"', sys.executable, "-c", script],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        stdout, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        run = psutil.Process(process.pid)
        contexts.stop_processes(run.children(recursive=True) + [run])
        pytest.fail("the run hung waiting for TFF's local worker")
    assert process.returncode == 0 and stdout.split() == ["1", "stopped"]


def test_worker_refuses_a_taken_port_in_one_line(tmp_path):
    port = portpicker.pick_unused_port()
    first = start_worker(port, tmp_path / "first.log")
    try:
        contexts.connect(f"127.0.0.1:{port}", timeout=60).close()
        second = subprocess.run(
            [sys.executable, "-m", "tff_programs.worker", f"--port={port}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        contexts.stop_processes([psutil.Process(first.pid)])
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [f"error: port {port} is not free: Address already in use"]
    assert first.wait(timeout=10) == 0  # the worker exits cleanly on SIGTERM


# --- rounds on workers ---------------------------------------------------------------------------


def _fedavg_weights(process, client_data, rounds):
    state = process.initialize()
    for _ in range(rounds):
        state = process.next(state, client_data).state
    return [np.asarray(w) for w in state.global_model_weights.trainable]


def test_fedavg_on_one_and_two_workers_matches_local(two_workers):
    import tensorflow as tf
    import tensorflow_federated as tff

    rng = np.random.default_rng(0)
    client_data = []
    for _ in range(4):
        x = rng.normal(size=(32, 4)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)
        client_data.append(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))

    def model_fn():
        keras_model = tf.keras.Sequential(
            [tf.keras.layers.Dense(3, activation="softmax", kernel_initializer="zeros", input_shape=(4,))]
        )
        return tff.learning.models.from_keras_model(
            keras_model, loss=tf.keras.losses.SparseCategoricalCrossentropy(), input_spec=client_data[0].element_spec
        )

    process = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn, client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.5)
    )
    weights = {}
    for name, workers in (("local", []), ("1 worker", two_workers[:1]), ("2 workers", two_workers)):
        contexts.install_context(workers=workers)
        weights[name] = _fedavg_weights(process, client_data, rounds=3)
    assert np.abs(weights["local"][0]).max() > 0.1  # it trained
    for name in ("1 worker", "2 workers"):
        for got, want in zip(weights[name], weights["local"]):
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)


class _RecordingStub:
    """Wraps a worker's executor stub: keeps every value sent to (CreateValue) and received from
    (Compute) its worker, as protos."""

    def __init__(self, stub):
        self._stub = stub
        self.sent, self.received = [], []

    def create_value(self, request):
        self.sent.append(request.value)
        return self._stub.create_value(request)

    def compute(self, request):
        response = self._stub.compute(request)
        self.received.append(response.value)
        return response

    def __getattr__(self, name):
        return getattr(self._stub, name)


def _placed_numbers(value_proto, placement="unplaced"):
    """(placement uri, number) for every tensor element in a serialized TFF value."""
    from tensorflow_federated.python.core.impl.executors import value_serialization

    kind = value_proto.WhichOneof("value")
    if kind == "federated":
        uri = value_proto.federated.type.placement.value.uri
        for member in value_proto.federated.value:
            yield from _placed_numbers(member, uri)
    elif kind == "struct":
        for element in value_proto.struct.element:
            yield from _placed_numbers(element.value, placement)
    elif kind == "array":
        array, _ = value_serialization.deserialize_value(value_proto)
        for number in np.asarray(array).ravel():
            yield placement, float(number)


def test_private_client_state_stays_with_its_client_on_two_workers(two_workers, monkeypatch):
    """A stateful-clients round as FedKL's: private state is a CLIENTS-placed argument, updated on
    the worker that runs that client and returned to the same client; SERVER gets only the mean
    of the shared part. The first clients are made slow, so the second worker finishes first (TFF's
    own mergeable context then hands the clients' results back in the wrong order)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    stubs = []
    watched_stub = contexts._WatchedStub

    def recording_stub(channel, watch):
        stubs.append(_RecordingStub(watched_stub(channel, watch)))
        return stubs[-1]

    @tff.tensorflow.computation(np.float32, np.float32)
    def client_work(private, steps):
        m = tf.random.stateless_normal([300, 300], seed=[1, 2]) + steps
        _, product = tf.while_loop(
            lambda i, a: i < tf.cast(steps, tf.int32),
            lambda i, a: (i + 1, tf.math.l2_normalize(tf.matmul(a, m))),
            (0, m),
        )
        # The shared update does not depend on the private state; the private state is updated.
        return private + 1.0, 10.0 * steps + 0.0 * tf.reduce_sum(product)

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS), tff.FederatedType(np.float32, tff.CLIENTS))
    def round_fn(private, steps):
        new_private, shared = tff.federated_map(client_work, (private, steps))
        return new_private, tff.federated_mean(shared)

    private = [7001.5, 7002.5, 7003.5, 7004.5]
    steps = [3000.0, 2000.0, 1.0, 2.0]
    monkeypatch.setattr(contexts, "_WatchedStub", recording_stub)
    contexts.install_context(workers=two_workers)
    new_private, server_mean = round_fn(private, steps)
    assert len(stubs) == 2

    assert new_private == [p + 1.0 for p in private]
    assert server_mean == pytest.approx(10.0 * np.mean(steps))
    clients_uri = tff.CLIENTS.uri
    private_values = set(private) | set(new_private)
    for worker, stub in enumerate(stubs):
        sent = list(_placed_numbers_all(stub.sent))
        seen_private = {n for placement, n in sent if n in private_values}
        assert seen_private == set(private[2 * worker : 2 * worker + 2]), f"worker {worker}"
        assert all(placement == clients_uri for placement, n in sent if n in private_values)
        received = list(_placed_numbers_all(stub.received))
        assert all(placement == clients_uri for placement, n in received if n in private_values)
        assert {n for placement, n in received if placement != clients_uri}  # partial sums came back


def _placed_numbers_all(value_protos):
    for value_proto in value_protos:
        yield from _placed_numbers(value_proto)


def test_fedkl_rounds_on_two_workers_match_local(two_workers):
    """Two FedKL rounds: same shared weights, and each client's own key and lock, as on one machine."""
    results = fedkl_rounds({"local": [], "2 workers": two_workers})
    assert_same_fedkl_results(results["2 workers"], results["local"])


@pytest.mark.slow
def test_workers_benchmark_runs_and_agrees_with_local(tmp_path):
    from experiments import common
    from experiments.perf import workers

    payload = common.validate_payload("workers", workers.run(quick=True, log_dir=str(tmp_path)))
    results = payload["results"]
    assert set(results["median_seconds_per_round"]) == {"local", "1 worker", "2 workers"}
    assert all(len(t) == payload["settings"]["repeats"] for t in results["seconds_per_round"].values())
    assert max(results["max_abs_diff_shared_weights_vs_local"].values()) < 1e-5  # the failover run's too
    failover = results["failover"]
    assert (failover["failures_named"], failover["returns_named"]) == (1, 1)
    timeout = workers.FAILURE_TIMEOUT
    assert timeout - min(5.0, timeout / 4) <= failover["detection_seconds"] <= timeout + 2.0
    assert not contexts.worker_processes()
