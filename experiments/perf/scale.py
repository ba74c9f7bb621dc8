"""Scale: FedKL round time and driver memory for client populations of 10, 1,000 and 10,000.

Each population runs in a fresh process (`python -m experiments.perf.scale --scale_population=N
--scale_out=...`) through the training program's own loop, `tfkl.federated.program.train` (what
`python -m tff_programs.train` runs): locked LeNet 32x32x1, CSPRNG keys, persistent client optimizer
state, 10 clients sampled per round on TFF's local C++ context, metrics.csv and TensorBoard, each
client's data in a file under client_data/ (the default; also measured without, --nocache_client_data)
and the client states in the run's ClientStore on disk: each client's created on its first sampling,
only the round's sampled clients read. Every client holds 64
examples drawn from one synthetic pool of 640, so the data set does not grow with the population and
every round trains the same amount: the figures isolate the cost of the population itself.

Round time is the time between two rounds' metrics releases (all a round costs: reading and creating
the sampled clients' states, the TFF round, saving the round); the first round (TFF's tracing) is
reported apart. The driver's peak RSS comes from `os.wait4` (getrusage of the finished child); the
TFF C++ worker's RSS is sampled at each round. The populations run one after the other, in 4 passes of
rotated order (10, 1,000, 10,000; 1,000, 10,000, 10; 10,000, 10, 1,000; ...), each with and without the
data cache in turn, so that other load on the machine falls on all of them; ratios compare runs of the
same invocation.

A fresh run creates few clients per round, so its client index (the per-round manifest) is small. The
`store` part (`--scale_mode=store`, its own process per population) measures that index's cost late
in a long run, when every client of the population has a state: the same ClientStore calls a round
makes (read or create the sampled clients, save the changed ones, prune), on tiny states.
"""

import collections
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments import common

_POPULATION = flags.DEFINE_integer("scale_population", 10, "Number of clients.", lower_bound=1)
_CLIENTS_PER_ROUND = flags.DEFINE_integer("scale_clients_per_round", 10, "Clients sampled per round.", lower_bound=1)
_ROUNDS = flags.DEFINE_integer("scale_rounds", 8, "Rounds to run (the first includes TFF's tracing).", lower_bound=2)
_MODE = flags.DEFINE_enum("scale_mode", "train", ["train", "store"], "What to measure (see the module's doc).")
_CACHE = flags.DEFINE_bool("scale_cache_client_data", True, "train: RunOptions.cache_client_data (client data files).")
_OUT = flags.DEFINE_string("scale_out", None, "JSON file for this population's measurements.")
_DIR = flags.DEFINE_string("scale_dir", None, "Directory for the run (deleted by the parent).")
flags.register_validator("scale_out", lambda path: path is not None, "--scale_out is required")
flags.register_validator("scale_dir", lambda path: path is not None, "--scale_dir is required")

POPULATIONS = (10, 1000, 10000)
CLIENTS_PER_ROUND = 10
EXAMPLES_PER_CLIENT = 64
POOL_SIZE = 640
INPUT_SHAPE = (32, 32, 1)
TARGET_ROUND_TIME_RATIO = 1.2


def _settings(quick):
    return {
        "populations": [10, 30] if quick else list(POPULATIONS),
        "clients_per_round": CLIENTS_PER_ROUND,
        "rounds": 3 if quick else 10,
        "passes": 1 if quick else 4,
        "cache_client_data": [True] if quick else [True, False],
        "model": "locked LeNet (key_dim 1024)",
        "input_shape": list(INPUT_SHAPE),
        "examples_per_client": EXAMPLES_PER_CLIENT,
        "example_pool": POOL_SIZE,
        "batch_size": 64,
        "client_state": "key + lock weights + momentum buffers of every trainable variable, in the run's ClientStore",
        "path": "tfkl.federated.program.train (the loop of tff_programs.train), keep_rounds=5, cached client data",
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


class _Shares:
    """Client i's example indices: 64 of the pool, drawn per client (nothing stored per client)."""

    def __init__(self, population):
        self.population = population

    def __len__(self):
        return self.population

    def __getitem__(self, client):
        import numpy as np

        if not 0 <= int(client) < self.population:
            raise IndexError(client)
        return np.sort(np.random.default_rng([int(client), 0x5CA1E]).choice(POOL_SIZE, EXAMPLES_PER_CLIENT, False))


def _synthetic_dataset():
    import numpy as np

    from tfkl import data

    rng = np.random.default_rng(0)
    images = rng.random((POOL_SIZE,) + INPUT_SHAPE, dtype=np.float32)
    labels = rng.integers(0, 10, POOL_SIZE)
    return data.Dataset("synthetic", images, labels, images[:10], labels[:10], 10)


def _dir_mb(path):
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 2**20


def _timed(owner, name, spent, part):
    """Wraps `owner.name` so that its seconds add up in `spent[part]` (the round's breakdown)."""
    function = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.monotonic()
        try:
            return function(*args, **kwargs)
        finally:
            spent[part] += time.monotonic() - start

    setattr(owner, name, timed)


def measure_population(population, clients_per_round, rounds, root_dir, cache_client_data=True):
    """Trains `rounds` FedKL rounds with `population` clients in this process; returns the figures."""
    import numpy as np
    import psutil
    import tensorflow_federated as tff

    from experiments import runtime
    from tfkl.federated import program, run_dir, simulation
    from tfkl.federated.client_store import ClientStore
    from tfkl.federated.config import Config

    # Where a round's time goes: its clients' states (read, or created on a first sampling), their data
    # pipelines (with the cache, a first sampling writes the client's data file), saving the round, and
    # the garbage collector.
    spent = collections.Counter()
    _timed(run_dir.RunStateManager, "client_states", spent, "client_states_s")
    _timed(program, "client_dataset", spent, "client_data_s")
    _timed(run_dir.RunStateManager, "save", spent, "save_s")
    _timed(simulation, "run_round", spent, "run_round_s")  # the TFF round, with its clients' data pipelines
    import gc

    gc.callbacks.append(_gc_clock(spent))
    releases = []

    class RoundClock(tff.program.ReleaseManager):
        """Records when each round's metrics are released, the TFF worker's memory then, and the
        round's breakdown (its save is counted in the next round's)."""

        async def release(self, value, key=None):
            releases.append(
                dict(
                    round=key,
                    time=time.monotonic(),
                    worker_rss_mb=_rss_mb(runtime.worker_processes()),
                    driver_rss_mb=_rss_mb([psutil.Process()]),
                    loss=float(value["loss"]),
                    **spent,
                )
            )
            spent.clear()

    runtime.install_context(workers=[])
    config = Config(
        model="lenet",
        input_shape=INPUT_SHAPE,
        num_classes=10,
        num_clients=population,
        clients_per_round=min(clients_per_round, population),
        batch_size=64,
        learning_rate=0.01,
    )
    options = program.RunOptions(rounds=rounds, progress=False, cache_client_data=cache_client_data)
    run_dir.check_config(root_dir, config)  # before the release managers create their files in root_dir
    managers = tff.program.GroupingReleaseManager([run_dir.metrics_manager(root_dir), RoundClock()])
    start = time.monotonic()
    program.train(root_dir, config, options, _synthetic_dataset(), _Shares(population), managers)
    total_s = time.monotonic() - start
    runtime.shutdown()
    times = [start] + [r["time"] for r in releases]
    round_s = [b - a for a, b in zip(times, times[1:])]
    parts = ("client_states_s", "client_data_s", "run_round_s", "save_s", "gc_s", "gc_full_passes")
    store = ClientStore(os.path.join(root_dir, "clients"))
    return {
        "population": population,
        "cache_client_data": cache_client_data,
        "rounds": [r["round"] for r in releases],
        "round_s": round_s,
        "steady_round_s": float(np.median(round_s[1:])),
        "breakdown_s": {part: [r.get(part, 0.0) for r in releases] for part in parts},
        "train_s": total_s,
        "clients_with_state": len(store.client_ids(store.rounds()[-1])),
        "client_store_mb": _dir_mb(os.path.join(root_dir, "clients")),
        "client_data_mb": _dir_mb(run_dir.client_data_dir(root_dir)),
        "tff_worker_rss_mb_max": max(r["worker_rss_mb"] for r in releases),
        "driver_rss_mb_by_round": [r["driver_rss_mb"] for r in releases],
        "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss_last_round": releases[-1]["loss"],
    }


def _gc_clock(spent):
    """Adds the seconds of the garbage collector's passes to `spent['gc_s']` (full passes counted in
    `spent['gc_full_passes']`); returns the callback, for gc.callbacks."""
    started = []

    def clock(phase, info):
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            spent["gc_s"] += time.perf_counter() - started.pop()
            spent["gc_full_passes"] += info["generation"] == 2

    return clock


def measure_store(population, clients_per_round, rounds, directory):
    """A ClientStore in which all `population` clients have a (tiny) state: the seconds of the store
    calls a round makes, the garbage collector's share, one more round's Python peak memory, and the
    manifest's size."""
    import gc
    import tracemalloc

    import numpy as np

    from tfkl.federated import simulation
    from tfkl.federated.client_store import ClientStore

    def tiny(value=0.0):
        return collections.OrderedDict(key=[], lock=[np.full(4, value, np.float32)], optimizer=[], statistics=[])

    def store_round(round_num):
        sampled = simulation.sample_clients(population, min(clients_per_round, population), 0, round_num)
        states, _ = store.load_or_create(round_num - 1, sampled, lambda c: tiny())
        store.save(round_num, {c: tiny(round_num) for c in states}, changed=set(states))
        store.prune(set(store.rounds()[-5:]) | {0})

    store = ClientStore(directory)
    start = time.monotonic()
    store.save(0, {str(c): tiny() for c in range(population)}, changed={str(c) for c in range(population)})
    populate_s = time.monotonic() - start
    spent = collections.Counter()
    round_s, gc_s, full_passes = [], [], []
    gc.callbacks.append(_gc_clock(spent))
    for round_num in range(1, rounds + 1):
        spent.clear()
        start = time.monotonic()
        store_round(round_num)
        round_s.append(time.monotonic() - start)
        gc_s.append(spent["gc_s"])
        full_passes.append(spent["gc_full_passes"])
    tracemalloc.start()
    store_round(rounds + 1)
    peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return {
        "population": population,
        "populate_s": populate_s,
        "store_round_s": round_s,
        "store_steady_round_s": float(np.median(round_s[1:])),
        "store_gc_s": gc_s,
        "store_gc_full_passes": int(sum(full_passes[1:])),
        "store_python_peak_mb": peak_mb,
        "manifest_mb": os.path.getsize(store.manifest_path(rounds + 1)) / 2**20,
    }


def run_child(population, settings, mode="train", cache_client_data=True, timeout_s=3600):
    """Measures one population in a fresh process; adds the child's peak RSS from os.wait4."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "population.json")
        env = dict(os.environ, PYTHONPATH=common.REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.perf.scale",
                f"--scale_population={population}",
                f"--scale_clients_per_round={settings['clients_per_round']}",
                f"--scale_rounds={settings['rounds']}",
                f"--scale_mode={mode}",
                f"--scale_cache_client_data={cache_client_data}",
                f"--scale_out={out}",
                f"--scale_dir={os.path.join(tmp, 'run')}",
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


def _pool(runs):
    """One population's passes: every round after the first pooled, the largest peak RSS."""
    import numpy as np

    done = [r for r in runs if "error" not in r]
    if not done:
        return {"population": runs[0]["population"], "error": "; ".join(r["error"] for r in runs)}
    steady = [s for r in done for s in r["round_s"][1:]]
    parts = done[0]["breakdown_s"]
    return {
        "population": done[0]["population"],
        "cache_client_data": done[0]["cache_client_data"],
        "passes": len(done),
        "first_round_s": float(np.median([r["round_s"][0] for r in done])),
        "steady_round_s": float(np.median(steady)),
        "steady_round_s_quartiles": [float(q) for q in np.percentile(steady, [25, 75])],
        "steady_breakdown_s": {p: float(np.median([x for r in done for x in r["breakdown_s"][p][1:]])) for p in parts},
        "gc_full_passes_per_round": float(np.mean([x for r in done for x in r["breakdown_s"]["gc_full_passes"][1:]])),
        "driver_peak_rss_mb": max(r["driver_peak_rss_mb"] for r in done),
        "driver_peak_rss_mb_per_pass": [r["driver_peak_rss_mb"] for r in done],
        "tff_worker_rss_mb_max": max(r["tff_worker_rss_mb_max"] for r in done),
        "clients_with_state": done[0]["clients_with_state"],
        "client_store_mb": max(r["client_store_mb"] for r in done),
        "errors": [r["error"] for r in runs if "error" in r],
    }


def _per_pass_ratios(top_runs, base_runs):
    """Round time ratio (medians of the rounds after the first) of the two populations within each pass."""
    import numpy as np

    return [
        float(np.median(top["round_s"][1:]) / np.median(base["round_s"][1:]))
        if "error" not in top and "error" not in base
        else None
        for top, base in zip(top_runs, base_runs)
    ]


def _data_label(cache_client_data):
    return "files (default)" if cache_client_data else "inline (--nocache_client_data)"


def _train_rows(pooled):
    rows = []
    base = next((r for r in pooled if "error" not in r), None)
    for r in pooled:
        if "error" in r:
            rows.append([r["population"], None, r["error"]] + [None] * 14)
            continue
        parts = r["steady_breakdown_s"]
        rows.append(
            [
                r["population"],
                _data_label(r["cache_client_data"]),
                r["first_round_s"],
                r["steady_round_s"],
                r["steady_round_s"] / base["steady_round_s"],
                parts["client_states_s"],
                parts["client_data_s"],
                parts["run_round_s"] - parts["client_data_s"],
                parts["save_s"],
                parts["gc_s"],
                r["gc_full_passes_per_round"],
                r["driver_peak_rss_mb"],
                r["driver_peak_rss_mb"] / base["driver_peak_rss_mb"],
                r["tff_worker_rss_mb_max"],
                r["clients_with_state"],
                r["client_store_mb"],
                r["passes"],
            ]
        )
    return rows


def _headline(pooled):
    done = [r for r in pooled if "error" not in r]
    if len(done) < 2:
        return []
    base, top = done[0], done[-1]
    data = "cached client data" if base["cache_client_data"] else "inline client data"
    time_ratio = top["steady_round_s"] / base["steady_round_s"]
    return [
        {
            "metric": f"round time, {top['population']} vs {base['population']} clients ({data})",
            "value": time_ratio,
            "unit": "x",
            "target": f"<= {TARGET_ROUND_TIME_RATIO}x",
            "met": time_ratio <= TARGET_ROUND_TIME_RATIO,
        },
        {
            "metric": f"driver peak RSS, {top['population']} vs {base['population']} clients ({data})",
            "value": top["driver_peak_rss_mb"] / base["driver_peak_rss_mb"],
            "unit": "x",
            "target": "flat",
        },
        {
            "metric": f"driver peak RSS, {top['population']} minus {base['population']} clients ({data})",
            "value": top["driver_peak_rss_mb"] - base["driver_peak_rss_mb"],
            "unit": "MB",
        },
    ]


def run(quick):
    settings = _settings(quick)
    populations = settings["populations"]
    runs = {(cache, p): [] for cache in settings["cache_client_data"] for p in populations}
    for index in range(settings["passes"]):
        # Pass i starts at population i mod 3 (each population runs first, second and third in turn),
        # each population with and without the data cache, in alternating order.
        for population in populations[index % len(populations) :] + populations[: index % len(populations)]:
            for cache in settings["cache_client_data"][:: 1 if index % 2 == 0 else -1]:
                runs[cache, population].append(run_child(population, settings, cache_client_data=cache))
    pooled = {cache: [_pool(runs[cache, p]) for p in populations] for cache in settings["cache_client_data"]}
    per_pass = {
        f"{populations[-1]}_vs_{populations[0]}_{'files' if cache else 'inline'}": _per_pass_ratios(
            runs[cache, populations[-1]], runs[cache, populations[0]]
        )
        for cache in settings["cache_client_data"]
    }
    store = [run_child(p, settings, mode="store") for p in populations]
    return payload(settings, pooled, [r for key in runs for r in runs[key]], store, per_pass)


def payload(settings, pooled, runs, store, per_pass):
    """The benchmark's payload: `pooled` {cache_client_data: a row per population}, `runs` every child's
    result, `store` the store mode's per population, `per_pass` the largest population's ratio per pass."""
    store_rows = [
        [s["population"], s.get("error")] + [None] * 5
        if "error" in s
        else [
            s["population"],
            s["store_steady_round_s"] * 1000,
            s["store_gc_full_passes"],
            s["store_python_peak_mb"],
            s["manifest_mb"],
            s["driver_peak_rss_mb"],
            s["populate_s"],
        ]
        for s in store
    ]
    tables = [
        {
            "title": f"FedKL rounds through program.train, {CLIENTS_PER_ROUND} clients per round, locked LeNet "
            "32x32x1 (later rounds: medians; client states / client data / TFF round / save / GC: the seconds "
            "of a round spent there)",
            "columns": [
                "clients",
                "client data",
                "first round s",
                "later rounds s",
                "round time vs smallest",
                "client states s",
                "client data s",
                "TFF round s",
                "save s",
                "GC s",
                "full GC passes per round",
                "driver peak RSS MB",
                "peak RSS vs smallest",
                "TFF worker RSS MB",
                "clients with a state",
                "client store MB",
                "passes",
            ],
            "rows": [row for cache in settings["cache_client_data"] for row in _train_rows(pooled[cache])],
        },
        {
            "title": "Client store calls of a round when every client has a state (tiny states: the index's cost)",
            "columns": [
                "clients with a state",
                "store calls per round ms (median)",
                "full GC passes (rounds 2 on)",
                "Python peak MB in a round",
                "manifest MB",
                "process peak RSS MB",
                "populating s",
            ],
            "rows": store_rows,
        },
    ]
    return {
        "settings": settings,
        "results": {
            "populations": [r for cache in settings["cache_client_data"] for r in pooled[cache]],
            "runs": runs,
            "store": store,
            "round_time_ratio_per_pass": per_pass,
        },
        "tables": tables,
        "headline": [h for cache in settings["cache_client_data"] for h in _headline(pooled[cache])],
        "notes": NOTES,
    }


NOTES = [
    common.SHARED_MACHINE_NOTE,
    "Each population runs in its own process, in passes of rotated order; 'vs smallest' ratios "
    "compare runs of the same invocation. Later-round times pool every pass's rounds after the first; "
    "results.round_time_ratio_per_pass has the largest population's ratio within each pass (its spread "
    "shows how much the machine's other load moves one run).",
    "Client states live in the run's ClientStore on disk; a round reads its sampled clients' states only "
    "and creates a client's on its first sampling, so with 1,000 or 10,000 clients most rounds create "
    "their clients (a key file and an initial state file each; with the data cache, the client's data "
    "file too) while with 10 clients every client exists after round 1: that first-sampling work is "
    "part of the larger populations' round time ('client states s', 'client data s').",
    "The driver's RSS grows by about 5-7 MB per round at every population (driver_rss_mb_by_round): "
    "TFF's FileProgramStateManager, which saves the server state as a SavedModel each round, keeps native "
    "memory per save (4.7 MB for this server state, measured apart); the populations are compared at the "
    "same number of rounds.",
    "The store table: the index (one manifest per round, about 85 bytes per client with a state) is "
    "read and written whole, so its per-round cost grows with the clients that have a state, not with "
    "the states' size; a fresh run of the first table has few such clients.",
]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        if _MODE.value == "store":
            result = measure_store(_POPULATION.value, _CLIENTS_PER_ROUND.value, _ROUNDS.value, _DIR.value)
        else:
            result = measure_population(
                _POPULATION.value, _CLIENTS_PER_ROUND.value, _ROUNDS.value, _DIR.value, _CACHE.value
            )
    finally:
        shutil.rmtree(_DIR.value, ignore_errors=True)
    common.write_json(_OUT.value, result)


if __name__ == "__main__":
    import tensorflow  # noqa: F401  (imported before absl's main: see experiments/run.py)

    app.run(main)
