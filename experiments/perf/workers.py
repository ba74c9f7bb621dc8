"""Wall time of a FedKL round on TFF's local context vs 1 and 2 remote TFF workers (127.0.0.1).

The workers are `python -m tff_programs.worker` processes started here and stopped by PID. Each
execution context is built once and they take turns, in random order each repeat, on the same
FedKL run (LeNet, digits, every client sampled each round), one run per context from the same
initial state; after the same rounds, the shared weights must agree across contexts (reported as
the largest difference from the local context). On one machine, remote workers add gRPC hops and
cannot be faster than the local worker: the figures show the cost of the path to many machines.

Then failover: the same rounds once more on a fresh 2-worker context whose worker 2 is SIGKILLed halfway
through a round (at half the 2-worker median round time) and started again on its port before the last
round: the time until the driver names it, the failed round's time, the rounds on the one live worker,
the round after it is back, and the final weights against the local run's.
"""

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import portpicker
import psutil
import tensorflow_federated as tff

from experiments import common, runtime
from tfkl import data as data_lib
from tfkl.federated import simulation
from tfkl.federated.client_data import client_partition
from tfkl.federated.config import Config, build_process

BATCH_SIZE = 64


def _settings(quick):
    return {
        "dataset": "digits",
        "model": "lenet",
        "input_shape": [32, 32, 1],
        "batch_size": BATCH_SIZE,
        "num_clients": 4 if quick else 8,
        "clients_per_round": "all",
        "local_epochs": 1,
        "warmup_rounds": 1,
        "repeats": 4 if quick else 5,  # the failover run needs 5 rounds
        "contexts": ["local", "1 worker", "2 workers"],
        "workers": "python -m tff_programs.worker on 127.0.0.1, started and stopped (SIGTERM) by the run",
        "failover": {
            "worker_failure_timeout_s": FAILURE_TIMEOUT,
            "killed": "worker 2, SIGKILL, in round 3 at half the 2-worker median round time",
            "restarted": "before the last round, on the same port",
        },
    }


FAILURE_TIMEOUT = 10.0


def start_workers(count, log_dir):
    """(addresses, Popen list) of `count` new workers on free ports."""
    addresses = [f"127.0.0.1:{portpicker.pick_unused_port()}" for _ in range(count)]
    return addresses, [start_worker(address, log_dir) for address in addresses]


def start_worker(address, log_dir):
    """A `tff_programs.worker` on `address`'s port, accepting connections; its Popen."""
    os.makedirs(log_dir, exist_ok=True)
    port = runtime.parse_address(address)[1]
    with open(os.path.join(log_dir, f"worker_{port}_{time.time_ns()}.log"), "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tff_programs.worker", f"--port={port}"],
            cwd=common.REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    runtime.connect(address, timeout=120).close()
    return process


class _Run:
    """One FedKL run (server state and every client's private state) on one execution context."""

    def __init__(self, context, config, dataset, partition):
        self.context, self.config, self.dataset, self.partition = context, config, dataset, partition
        self.process = build_process(config)
        self.clients = list(range(config.num_clients))
        tff.framework.set_default_context(context)
        self.server_state = self.process.initialize()
        self.client_states = {c: self.process.initial_client_state(config.client_key(c)) for c in self.clients}

    def round(self):
        tff.framework.set_default_context(self.context)

        def client_data(cid):
            idx = self.partition[int(cid)]
            return data_lib.make_dataset(
                self.dataset.x_train[idx],
                self.dataset.y_train[idx],
                tuple(self.config.input_shape),
                BATCH_SIZE,
                shuffle_seed=0,
            )

        start = time.perf_counter()
        self.server_state, new_client_states, metrics, _ = simulation.run_round(
            self.process, self.server_state, self.client_states, self.clients, client_data, self.config.learning_rate
        )
        self.client_states.update(new_client_states)
        seconds = time.perf_counter() - start
        assert metrics["clients_accepted"] == len(self.clients)
        return seconds

    def shared_weights(self):
        return self.process.global_weights(self.server_state)[0]


class _FailureLog(logging.Handler):
    """Time (time.perf_counter) at which the driver logged each worker failure and return."""

    def __init__(self):
        super().__init__()
        self.failed, self.back = [], []

    def emit(self, record):
        message = record.getMessage()
        if "stopped answering" in message:
            self.failed.append(time.perf_counter())
        elif "answers again" in message:
            self.back.append(time.perf_counter())


def _failover(config, dataset, partition, addresses, processes, rounds, round_seconds, log_dir):
    """`rounds` rounds on a new 2-worker context; worker 2 killed inside round 3, restarted before the last."""
    events = _FailureLog()
    logging.getLogger().addHandler(events)
    try:
        context = runtime.install_context(workers=addresses, failure_timeout=FAILURE_TIMEOUT, on_failure="retry")
        failing = _Run(context, config, dataset, partition)
        seconds, killed_at = [], []

        def kill():
            killed_at.append(time.perf_counter())
            processes[1].send_signal(signal.SIGKILL)
            processes[1].wait()

        for round_num in range(1, rounds + 1):
            if round_num == 3:
                threading.Timer(round_seconds / 2, kill).start()
            if round_num == rounds:
                processes[1] = start_worker(addresses[1], log_dir)
                time.sleep(2 * min(5.0, FAILURE_TIMEOUT / 4))  # a health probe is answered
            seconds.append(failing.round())
        return failing, seconds, killed_at[0], events
    finally:
        logging.getLogger().removeHandler(events)


def run(quick, log_dir=None):
    settings = _settings(quick)
    log_dir = log_dir or os.path.join(common.REPO_ROOT, "runs", "bench_workers")
    dataset = data_lib.load(settings["dataset"])
    config = Config(
        dataset=dataset.name,
        input_shape=tuple(settings["input_shape"]),
        num_clients=settings["num_clients"],
        clients_per_round=settings["num_clients"],
        batch_size=BATCH_SIZE,
        lr_milestones=(),
        seeded_keys=True,
    )
    partition = client_partition(config, dataset)
    rng = np.random.default_rng(0)
    addresses, processes = start_workers(2, log_dir)
    try:
        runs = {
            name: _Run(runtime.install_context(workers=workers), config, dataset, partition)
            for name, workers in (("local", []), ("1 worker", addresses[:1]), ("2 workers", addresses))
        }
        first_round = {name: r.round() for name, r in runs.items()}
        times = {name: [] for name in runs}
        for _ in range(settings["repeats"]):
            for name in rng.permutation(list(runs)):
                times[name].append(runs[name].round())
        medians = {name: float(np.median(t)) for name, t in times.items()}
        failing, failover_seconds, killed_at, events = _failover(
            config, dataset, partition, addresses, processes, 1 + settings["repeats"], medians["2 workers"], log_dir
        )
        runs["2 workers, one killed"] = failing
        local = runs["local"].shared_weights()
        max_diff = {
            name: max(float(np.abs(a - b).max()) for a, b in zip(r.shared_weights(), local)) for name, r in runs.items()
        }
    finally:
        runtime.install_context(workers=[])
        runtime.shutdown()
        runtime.stop_processes([psutil.Process(p.pid) for p in processes if p.poll() is None])
    failover = {
        "seconds_per_round": failover_seconds,
        "failures_named": len(events.failed),
        "returns_named": len(events.back),
        "detection_seconds": events.failed[0] - killed_at if events.failed else None,
        "failed_round_seconds": failover_seconds[2],
        "one_worker_rounds_median_seconds": float(np.median(failover_seconds[3:-1])),
        "round_after_return_seconds": failover_seconds[-1],
        "max_abs_diff_shared_weights_vs_local": max_diff["2 workers, one killed"],
    }
    results = {
        "seconds_per_round": times,
        "first_round_seconds": first_round,
        "median_seconds_per_round": medians,
        "max_abs_diff_shared_weights_vs_local": max_diff,
        "failover": failover,
    }
    return payload(settings, results)


def payload(settings, results):
    """The benchmark's payload from the measured rounds."""
    times, first_round = results["seconds_per_round"], results["first_round_seconds"]
    medians, max_diff = results["median_seconds_per_round"], results["max_abs_diff_shared_weights_vs_local"]
    failover = results["failover"]
    failover_seconds = failover["seconds_per_round"]
    rows = [
        [
            name,
            round(first_round[name], 2),
            round(medians[name], 2),
            f"{min(t):.2f}-{max(t):.2f}",
            round(medians[name] / medians["local"], 2),
            f"{max_diff[name]:.1e}",
        ]
        for name, t in times.items()
    ]
    return {
        "settings": settings,
        "results": results,
        "headline": [
            {"metric": f"FedKL round, {name} / local", "value": round(medians[name] / medians["local"], 2), "unit": "x"}
            for name in ("1 worker", "2 workers")
        ]
        + [
            {"metric": "failed worker named after", "value": round(failover["detection_seconds"], 1), "unit": "s"},
            {
                "metric": "failed round / 2-worker round",
                "value": round(failover["failed_round_seconds"] / medians["2 workers"], 2),
                "unit": "x",
            },
        ],
        "tables": [
            {
                "title": f"FedKL round time by execution context ({settings['num_clients']} clients, LeNet, digits)",
                "columns": ["context", "first round s", "round s (median)", "range", "vs local", "max |w - w_local|"],
                "rows": rows,
            },
            {
                "title": (
                    f"Failover: worker 2 SIGKILLed inside round 3, restarted before round {len(failover_seconds)} "
                    f"(--worker_failure_timeout={FAILURE_TIMEOUT:g})"
                ),
                "columns": ["round", "seconds", "vs 2-worker median", "what happened"],
                "rows": [
                    [
                        r + 1,
                        round(t, 2),
                        round(t / medians["2 workers"], 2),
                        _failover_event(r + 1, len(failover_seconds), failover["detection_seconds"]),
                    ]
                    for r, t in enumerate(failover_seconds)
                ],
            },
        ],
        "notes": [
            common.SHARED_MACHINE_NOTE,
            f"{os.cpu_count()} logical CPUs: the workers share the cores with the driver, so no speed-up "
            "is possible here; with 2 workers each round is split into 2 subrounds (TFF's mergeable "
            "computations) whose partial sums are merged on one worker.",
            "The first round of each context includes compiling the computations for it.",
        ],
    }


def _failover_event(round_num, rounds, detection_seconds):
    if round_num == 1:
        return "first round (compiles)"
    if round_num == 3:
        return f"worker 2 killed mid-round, named {detection_seconds:.1f} s later; its clients rerun on worker 1"
    if round_num == rounds:
        return "worker 2 back (same port): both parts"
    return "two workers" if round_num < 3 else "worker 1 alone runs both parts"


if __name__ == "__main__":
    common.run_as_script("workers", run)
