"""Scale: FedKL round time and peak memory for client populations of 10, 100 and 1,000.

Each population runs in a fresh process (`python -m benchmarks.scale --scale_population=N
--scale_out=...`) through the public API: `tfkl.federated.build_fedkl_process` (locked LeNet
32x32x1, TorchSGD, persistent client optimizer state as in the paper), one private state per
client created up front (`process.initial_client_state(key)`, as the training program does), and
`tfkl.federated.simulation.sample_clients` / `run_round` with 10 clients per round on TFF's local
C++ context. Client data is synthetic (64 examples, one batch, per sampled client, made on demand),
so the figures isolate the cost of the population itself. Peak RSS of the driver process comes
from `os.wait4` (getrusage of the finished child); the TFF C++ worker's RSS is sampled after
each round. Populations are compared within one `make bench` run.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import common

_POPULATION = flags.DEFINE_integer("scale_population", 10, "Number of clients.", lower_bound=1)
_CLIENTS_PER_ROUND = flags.DEFINE_integer("scale_clients_per_round", 10, "Clients sampled per round.", lower_bound=1)
_ROUNDS = flags.DEFINE_integer("scale_rounds", 3, "Rounds to run (the first includes TFF's tracing).", lower_bound=1)
_OUT = flags.DEFINE_string("scale_out", None, "JSON file for this population's measurements.")
flags.register_validator("scale_out", lambda path: path is not None, "--scale_out is required")

POPULATIONS = (10, 100, 1000)
CLIENTS_PER_ROUND = 10
EXAMPLES_PER_CLIENT = 64
INPUT_SHAPE = (32, 32, 1)


def _settings(quick):
    return {
        "populations": [10, 30] if quick else list(POPULATIONS),
        "clients_per_round": CLIENTS_PER_ROUND,
        "rounds": 2 if quick else 3,
        "model": "locked LeNet",
        "input_shape": list(INPUT_SHAPE),
        "examples_per_client": EXAMPLES_PER_CLIENT,
        "batch_size": 64,
        "client_state": "key + lock weights + momentum buffers of every trainable variable",
        "context": "TFF local C++ execution context (tff_programs.contexts.install_context)",
    }


def _rss_mb(processes):
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except Exception:  # a worker that exited between listing and reading
            continue
    return total / 2**20


def measure_population(population, clients_per_round, rounds):
    """Runs `rounds` FedKL rounds with `population` clients in this process; returns the figures."""
    import numpy as np
    import tensorflow as tf

    from tff_programs import contexts
    import tfkl
    from tfkl import federated, models, optimizers
    from tfkl.federated import simulation

    contexts.install_context(workers=[])
    start = time.monotonic()
    process = federated.build_fedkl_process(
        lambda: models.build("lenet", INPUT_SHAPE, 10, lock=True, seed=0), optimizers.TorchSGD()
    )
    build_s = time.monotonic() - start
    start = time.monotonic()
    client_states = {
        str(c): process.initial_client_state(tfkl.generate_key(1024, seed=[0, c])) for c in range(population)
    }
    init_s = time.monotonic() - start
    state_bytes = sum(np.asarray(t).nbytes for s in client_states.values() for t in tf.nest.flatten(s))

    def client_data(client_id):
        rng = np.random.default_rng(int(client_id))
        images = rng.random((EXAMPLES_PER_CLIENT,) + INPUT_SHAPE, dtype=np.float32)
        labels = rng.integers(0, 10, EXAMPLES_PER_CLIENT)
        return tf.data.Dataset.from_tensor_slices((images, labels)).batch(64)

    server_state = process.initialize()
    round_s, worker_rss = [], []
    for round_num in range(1, rounds + 1):
        ids = simulation.sample_clients(population, min(clients_per_round, population), 0, round_num)
        start = time.monotonic()
        server_state, new_client_states, metrics, _ = simulation.run_round(
            process, server_state, client_states, ids, client_data, 0.01
        )
        client_states.update(new_client_states)
        round_s.append(time.monotonic() - start)
        worker_rss.append(_rss_mb(contexts.worker_processes()))
    contexts.shutdown()
    return {
        "population": population,
        "process_build_s": build_s,
        "client_state_init_s": init_s,
        "client_state_mb": state_bytes / 2**20,
        "round_s": round_s,
        "steady_round_s": float(np.median(round_s[1:])) if len(round_s) > 1 else None,
        "tff_worker_rss_mb_max": max(worker_rss),
        "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "accuracy_last_round": float(metrics["accuracy"]),
    }


def run_child(population, settings, timeout_s=3600):
    """Measures one population in a fresh process; adds the child's peak RSS from os.wait4."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "population.json")
        env = dict(os.environ, PYTHONPATH=common.REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.scale",
                f"--scale_population={population}",
                f"--scale_clients_per_round={settings['clients_per_round']}",
                f"--scale_rounds={settings['rounds']}",
                f"--scale_out={out}",
            ],
            cwd=common.REPO_ROOT,
            env=env,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                child.kill()
                os.wait4(child.pid, 0)
                return {"population": population, "error": f"timed out after {timeout_s} s"}
            time.sleep(0.5)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        if child.returncode:
            return {"population": population, "error": f"exit code {child.returncode}"}
        with open(out) as f:
            result = json.load(f)
    result["driver_peak_rss_mb"] = usage.ru_maxrss / 1024  # kilobytes on Linux
    return result


def run(quick):
    settings = _settings(quick)
    results = [run_child(p, settings) for p in settings["populations"]]
    done = [r for r in results if "error" not in r]
    base = done[0] if done else None
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["population"], r["error"]] + [None] * 7)
            continue
        relative = (
            r["steady_round_s"] / base["steady_round_s"] if r["steady_round_s"] and base["steady_round_s"] else None
        )
        rows.append(
            [
                r["population"],
                r["round_s"][0],
                r["steady_round_s"],
                relative,
                r["client_state_init_s"],
                r["client_state_mb"],
                r["driver_peak_rss_mb"],
                r["tff_worker_rss_mb_max"],
                r["driver_peak_rss_mb"] / base["driver_peak_rss_mb"],
            ]
        )
    table = {
        "title": f"FedKL rounds, {CLIENTS_PER_ROUND} clients per round, locked LeNet 32x32x1",
        "columns": [
            "clients",
            "first round s",
            "later rounds s (median)",
            "round time vs smallest",
            "client-state init s",
            "client states MB",
            "driver peak RSS MB",
            "TFF worker RSS MB",
            "peak RSS vs smallest",
        ],
        "rows": rows,
    }
    headline = []
    if len(done) > 1 and done[-1]["steady_round_s"] and base["steady_round_s"]:
        headline = [
            {
                "metric": f"round time, {done[-1]['population']} vs {base['population']} clients",
                "value": done[-1]["steady_round_s"] / base["steady_round_s"],
                "unit": "x",
            },
            {
                "metric": f"driver peak RSS, {done[-1]['population']} vs {base['population']} clients",
                "value": done[-1]["driver_peak_rss_mb"] / base["driver_peak_rss_mb"],
                "unit": "x",
            },
        ]
    notes = [
        common.SHARED_MACHINE_NOTE,
        "Each population runs in its own process, one after the other; 'vs smallest' ratios compare runs of "
        "the same `make bench` invocation.",
        "Client states are held in memory by the driver, as the training program does between rounds.",
    ]
    return {
        "settings": settings,
        "results": {"populations": results},
        "tables": [table],
        "headline": headline,
        "notes": notes,
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    result = measure_population(_POPULATION.value, _CLIENTS_PER_ROUND.value, _ROUNDS.value)
    common.write_json(_OUT.value, result)


if __name__ == "__main__":
    import tensorflow  # noqa: F401  (imported before absl's main: see benchmarks/run.py)

    app.run(main)
