"""Wall time of a FedKL round on TFF's local context vs 1 and 2 remote TFF workers (127.0.0.1).

The workers are `python -m tff_programs.worker` processes started here and stopped by PID. Each
execution context is built once and they take turns, in random order each repeat, on the same
FedKL run (LeNet, digits, every client sampled each round), one run per context from the same
initial state; after the same rounds, the shared weights must agree across contexts (reported as
the largest difference from the local context). On one machine, remote workers add gRPC hops and
cannot be faster than the local worker: the figures show the cost of the path to many machines.
"""

import os
import subprocess
import sys
import time

import numpy as np
import portpicker
import psutil
import tensorflow_federated as tff

from benchmarks import common
from tff_programs import contexts
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
        "repeats": 2 if quick else 5,
        "contexts": ["local", "1 worker", "2 workers"],
        "workers": "python -m tff_programs.worker on 127.0.0.1, started and stopped (SIGTERM) by the run",
    }


def start_workers(count, log_dir):
    """(addresses, Popen list) of `count` new workers on free ports."""
    os.makedirs(log_dir, exist_ok=True)
    addresses, processes = [], []
    for _ in range(count):
        port = portpicker.pick_unused_port()
        with open(os.path.join(log_dir, f"worker_{port}.log"), "wb") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tff_programs.worker", f"--port={port}"],
                    cwd=common.REPO_ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        addresses.append(f"127.0.0.1:{port}")
    for address in addresses:
        contexts.connect(address, timeout=120).close()
    return addresses, processes


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


def run(quick, log_dir=None):
    settings = _settings(quick)
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
    addresses, processes = start_workers(2, log_dir or os.path.join(common.REPO_ROOT, "runs", "bench_workers"))
    try:
        runs = {
            name: _Run(contexts.install_context(workers=workers), config, dataset, partition)
            for name, workers in (("local", []), ("1 worker", addresses[:1]), ("2 workers", addresses))
        }
        first_round = {name: r.round() for name, r in runs.items()}
        times = {name: [] for name in runs}
        for _ in range(settings["repeats"]):
            for name in rng.permutation(list(runs)):
                times[name].append(runs[name].round())
        local = runs["local"].shared_weights()
        max_diff = {
            name: max(float(np.abs(a - b).max()) for a, b in zip(r.shared_weights(), local)) for name, r in runs.items()
        }
    finally:
        contexts.install_context(workers=[])
        contexts.shutdown()
        contexts.stop_processes([psutil.Process(p.pid) for p in processes if p.poll() is None])
    medians = {name: float(np.median(t)) for name, t in times.items()}
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
        "results": {
            "seconds_per_round": times,
            "first_round_seconds": first_round,
            "median_seconds_per_round": medians,
            "max_abs_diff_shared_weights_vs_local": max_diff,
        },
        "headline": [
            {"metric": f"FedKL round, {name} / local", "value": round(medians[name] / medians["local"], 2), "unit": "x"}
            for name in ("1 worker", "2 workers")
        ],
        "tables": [
            {
                "title": f"FedKL round time by execution context ({settings['num_clients']} clients, LeNet, digits)",
                "columns": ["context", "first round s", "round s (median)", "range", "vs local", "max |w - w_local|"],
                "rows": rows,
            }
        ],
        "notes": [
            common.SHARED_MACHINE_NOTE,
            f"{os.cpu_count()} logical CPUs: the workers share the cores with the driver, so no speed-up "
            "is possible here; with 2 workers each round is split into 2 subrounds (TFF's mergeable "
            "computations) whose partial sums are merged on one worker.",
            "The first round of each context includes compiling the computations for it.",
        ],
    }


if __name__ == "__main__":
    common.run_as_script("workers", run)
