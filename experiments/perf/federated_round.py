"""Wall time of one federated round (TFF, stateful clients) against plain Keras fit on as many examples.

The same LeNet sees the same examples: a FedKL round (locked model, every sampled client one local
epoch, private state in and out, shared update summed), a FedAvg round (the model without the lock),
and `model.fit` for one epoch over the union of those clients' examples (the locked model, Keras SGD
with Nesterov momentum, batch 64). The variants alternate in random order each repeat and each
repeat gives a paired ratio round / fit; we report the ratios' median and range. Two settings:
3 clients all sampled (the paper's) and 100 clients with 10 sampled per round.
"""

import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf

from experiments import common, runtime
from tfkl import data as data_lib
from tfkl.federated import simulation
from tfkl.federated.client_data import client_dataset, client_partition
from tfkl.federated.config import Config, build_process

BATCH_SIZE = 64


def _settings(quick):
    return {
        "dataset": "digits" if quick else "fashion_mnist",
        "model": "lenet",
        "input_shape": [32, 32, 1],
        "batch_size": BATCH_SIZE,
        "local_epochs": 1,
        "repeats": 1 if quick else 3,
        "warmup": 1,
        "scenarios": [[3, 3], [100, 10]] if not quick else [[3, 3]],
        "client_optimizer": "TorchSGD lr 0.01, momentum 0.9, Nesterov, wd 5e-4; persistent state",
        "keras_fit": "tf.keras SGD(0.01, momentum 0.9, Nesterov), no weight decay, same locked LeNet",
    }


class _Scenario:
    """One (num_clients, clients_per_round) setting: its runs and the matching Keras fit."""

    def __init__(self, dataset, num_clients, per_round):
        self.dataset = dataset
        self.configs = {
            alg: Config(
                algorithm=alg,
                dataset=dataset.name,
                input_shape=(32, 32, 1),
                num_clients=num_clients,
                clients_per_round=per_round,
                batch_size=BATCH_SIZE,
                lr_milestones=(),
                seeded_keys=True,
            )
            for alg in ("fedkl", "fedavg")
        }
        self.partition = client_partition(self.configs["fedkl"], dataset)
        self.sampled = simulation.sample_clients(num_clients, per_round, 0, 1)
        indices = np.concatenate([self.partition[int(c)] for c in self.sampled])
        self.num_examples = int(len(indices))
        self.processes = {alg: build_process(c) for alg, c in self.configs.items()}
        self.states = {}
        for alg, process in self.processes.items():
            config = self.configs[alg]
            clients = {
                c: process.initial_client_state(config.client_key(c) if config.locked else None) for c in self.sampled
            }
            self.states[alg] = [process.initialize(), clients]
        model = self.configs["fedkl"].model_fn()()
        model.compile(
            tf.keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
            tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        self.model = model
        self.fit_data = data_lib.make_dataset(
            dataset.x_train[indices], dataset.y_train[indices], (32, 32, 1), BATCH_SIZE, shuffle_seed=0
        )

    def federated_round(self, algorithm, cache_dir):
        process, config = self.processes[algorithm], self.configs[algorithm]
        server_state, clients = self.states[algorithm]

        def client_data(cid):
            return client_dataset(config, self.dataset, self.partition[int(cid)], 0, cache_dir, cid)

        start = time.perf_counter()
        server_state, new_client_states, metrics, _ = simulation.run_round(
            process, server_state, clients, self.sampled, client_data, config.learning_rate
        )
        seconds = time.perf_counter() - start
        self.states[algorithm][0] = server_state
        clients.update(new_client_states)
        assert metrics["num_examples"] == self.num_examples
        return seconds

    def keras_fit(self):
        start = time.perf_counter()
        self.model.fit(self.fit_data, epochs=1, verbose=0)
        return time.perf_counter() - start


def run(quick):
    settings = _settings(quick)
    dataset = data_lib.load(settings["dataset"])
    rng = np.random.default_rng(0)
    runtime.install_context()
    results = {}
    try:
        for num_clients, per_round in settings["scenarios"]:
            results[f"{num_clients}_clients_{per_round}_per_round"] = measure(
                _Scenario(dataset, num_clients, per_round), settings, rng
            )
    finally:
        runtime.shutdown()
    return payload(settings, results)


ROUNDS = ("fedkl_round", "fedavg_round", "fedkl_round_inline_data")


def measure(scenario, settings, rng):
    """One scenario's round and fit times, interleaved in random order, and their ratios."""
    cache_dir = tempfile.mkdtemp(prefix="federated_round_")
    variants = {
        "fedkl_round": lambda s=scenario, d=cache_dir: s.federated_round("fedkl", d),
        "fedavg_round": lambda s=scenario, d=cache_dir: s.federated_round("fedavg", d),
        "fedkl_round_inline_data": lambda s=scenario: s.federated_round("fedkl", None),
        "keras_fit": scenario.keras_fit,
    }
    for fn in variants.values():
        for _ in range(settings["warmup"]):
            fn()
    times = {name: [] for name in variants}
    for _ in range(settings["repeats"]):
        for name in rng.permutation(list(variants)):
            times[name].append(variants[name]())
    shutil.rmtree(cache_dir)
    ratios = {f"{name}_over_fit": [r / f for r, f in zip(times[name], times["keras_fit"])] for name in ROUNDS}
    return {
        "examples_per_round": scenario.num_examples,
        "seconds": times,
        "ratios": ratios,
        "median_ratio": {k: float(np.median(v)) for k, v in ratios.items()},
    }


def payload(settings, results):
    """The benchmark's payload from each scenario's measurements."""
    rows, headline = [], []
    for key, result in results.items():
        times = result["seconds"]
        for name in ROUNDS:
            r = result["ratios"][f"{name}_over_fit"]
            rows.append(
                [
                    key,
                    name,
                    result["examples_per_round"],
                    round(float(np.median(times[name])), 2),
                    round(float(np.median(times["keras_fit"])), 2),
                    round(float(np.median(r)), 2),
                    f"{min(r):.2f}-{max(r):.2f}",
                ]
            )
            headline.append(
                {"metric": f"{name} / Keras fit, {key}", "value": round(float(np.median(r)), 2), "unit": "x"}
            )
    return {
        "settings": settings,
        "results": results,
        "headline": headline,
        "tables": [
            {
                "title": "Federated round vs Keras fit on the same examples (LeNet, batch 64)",
                "columns": [
                    "setting",
                    "variant",
                    "examples",
                    "round s (median)",
                    "fit s (median)",
                    "ratio (median)",
                    "ratio range",
                ],
                "rows": rows,
            }
        ],
        "notes": [
            common.SHARED_MACHINE_NOTE,
            "A round ships each client's tf.data pipeline to the TFF worker (reading the client's "
            "examples from a file, as `train` does; '_inline_data': the examples serialised "
            "into the pipeline), builds the client model there, moves private state in and out and "
            "applies the server update; Keras fit runs in-process on an already built model.",
            "Keras fit uses Keras SGD (no weight decay); the round uses TorchSGD with coupled weight decay.",
        ],
    }


if __name__ == "__main__":
    common.run_as_script("federated_round", run)
