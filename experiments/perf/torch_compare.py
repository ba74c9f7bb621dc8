"""Training throughput of our tf.keras FedKL models vs our PyTorch port of the official ones, same CPU.

Both sides train the locked LeNet and ResNet-20 (FedKL's LeNet_kl / ResNet-20_kl: lock block after
the first conv) at 32x32x3, batch 64, with SGD (lr 0.01, momentum 0.9, Nesterov, weight decay
5e-4): ours is `tfkl.models.build(lock=True)` + `tfkl.training.Trainer` (TorchSGD) in
experiments/perf/tf_step_worker.py; PyTorch's is experiments/perf/torch_side/fedkl_models.py + torch.optim.SGD
in experiments/perf/torch_side/step_worker.py, run by the separate .venv-torch (`make torch-venv`).
Both are long-lived subprocesses timed alternately (random order per repeat), so both see the
same machine load and each repeat gives a paired ratio; speed ratio = ours / PyTorch examples per
second (> 1: ours is faster). Each thread configuration gets its own pair of processes.
"""

import json
import os
import subprocess
import sys

import numpy as np

from experiments import common

ARCHITECTURES = ("lenet", "resnet20")
BATCH_SIZE = 64
TORCH_PYTHON = os.path.join(common.REPO_ROOT, ".venv-torch", "bin", "python")
TORCH_WORKER = "experiments.perf.torch_side.step_worker"  # run with -m from the repository root
# (name, threads, inter-op threads); 0 = the framework's default (one thread per logical CPU).
THREAD_CONFIGS = (("default", 0, 0), ("1 thread", 1, 1))
TARGET_RATIO = 1.0


class Worker:
    """A step-timer subprocess speaking the JSON-line protocol of experiments/perf/*step_worker.py."""

    def __init__(self, argv, env=None):
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=common.REPO_ROOT, env=env
        )

    def ask(self, **command):
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"step worker {self.process.args[:3]} exited (code {self.process.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"step worker: {answer['error']}")
        return answer

    def close(self):
        self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.process.stdin.close()
        self.process.wait(timeout=120)


def torch_worker(threads, interop_threads):
    if not os.path.exists(TORCH_PYTHON):
        raise FileNotFoundError(f"{TORCH_PYTHON} not found: create the PyTorch venv with `make torch-venv`")
    return Worker(
        [
            TORCH_PYTHON,
            "-m",
            TORCH_WORKER,
            f"--batch_size={BATCH_SIZE}",
            f"--threads={threads}",
            f"--interop_threads={interop_threads}",
        ]
    )


def tf_worker(threads, interop_threads):
    env = dict(os.environ, PYTHONPATH=common.REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    return Worker(
        [
            sys.executable,
            "-m",
            "experiments.perf.tf_step_worker",
            f"--batch_size={BATCH_SIZE}",
            f"--intra_op_threads={threads}",
            f"--inter_op_threads={interop_threads}",
        ],
        env,
    )


def _settings(quick):
    return {
        "architectures": list(ARCHITECTURES),
        "batch_size": BATCH_SIZE,
        "input_shape": [32, 32, 3],
        "optimizer": "SGD lr 0.01, momentum 0.9, Nesterov, weight decay 5e-4",
        "thread_configs": [{"name": n, "threads": t, "interop_threads": i} for n, t, i in THREAD_CONFIGS],
        "steps_per_block": {"lenet": 3 if quick else 30, "resnet20": 1 if quick else 4},
        "repeats": 2 if quick else 10,
        "warmup_steps": 2 if quick else 5,
    }


def measure(architecture, workers, settings, rng):
    """Interleaved per-step times of `architecture` on each side; paired speed ratios."""
    steps = settings["steps_per_block"][architecture]
    info = {side: worker.ask(cmd="setup", model=architecture) for side, worker in workers.items()}
    for worker in workers.values():
        worker.ask(cmd="time", model=architecture, steps=settings["warmup_steps"])
    times = {side: [] for side in workers}
    for _ in range(settings["repeats"]):
        for side in rng.permutation(list(workers)):
            times[side].append(workers[side].ask(cmd="time", model=architecture, steps=steps)["seconds_per_step"])
    speed_ratio = np.asarray(times["torch"]) / np.asarray(times["tfkl"])
    return {
        "parameters": {side: i["parameters"] for side, i in info.items()},
        "runtime": info,
        "seconds_per_step": {side: common.summarize(t) for side, t in times.items()},
        "examples_per_second": {side: BATCH_SIZE / float(np.median(t)) for side, t in times.items()},
        "speed_ratio_tfkl_over_torch": common.summarize(speed_ratio),
        "speed_ratio_of_minima": float(np.min(times["torch"]) / np.min(times["tfkl"])),
    }


def run(quick):
    settings = _settings(quick)
    rng = np.random.default_rng(0)
    results = {}
    for config, threads, interop in THREAD_CONFIGS:
        workers = {"tfkl": tf_worker(threads, interop), "torch": torch_worker(threads, interop)}
        try:
            results[config] = {arch: measure(arch, workers, settings, rng) for arch in ARCHITECTURES}
        finally:
            for worker in workers.values():
                worker.close()
    rows, headline = [], []
    for config, by_arch in results.items():
        for arch, r in by_arch.items():
            ratio = r["speed_ratio_tfkl_over_torch"]
            rows.append(
                [
                    arch,
                    config,
                    r["examples_per_second"]["tfkl"],
                    r["examples_per_second"]["torch"],
                    ratio["median"],
                    f"{ratio['q1']:.3f}-{ratio['q3']:.3f}",
                    r["speed_ratio_of_minima"],
                    f"{r['parameters']['tfkl']} / {r['parameters']['torch']}",
                    ratio["n"],
                ]
            )
            headline.append(
                {
                    "metric": f"{arch} training throughput tfkl / PyTorch ({config})",
                    "value": ratio["median"],
                    "unit": "x",
                    "target": f">= {TARGET_RATIO:.1f}x",
                    "met": bool(ratio["median"] >= TARGET_RATIO),
                }
            )
    table = {
        "title": f"Training-step throughput, locked models, batch {BATCH_SIZE}, 32x32x3 (examples/s, medians)",
        "columns": [
            "model",
            "threads",
            "tfkl ex/s",
            "PyTorch ex/s",
            "speed ratio tfkl/PyTorch",
            "ratio IQR",
            "ratio of fastest blocks",
            "trainable params tfkl / PyTorch",
            "repeats",
        ],
        "rows": rows,
    }
    notes = [
        common.SHARED_MACHINE_NOTE,
        "'default' = each framework's own thread pools (one thread per logical CPU); '1 thread' = TF "
        "intra/inter-op 1 and torch.set_num_threads(1)/set_num_interop_threads(1). The side not being timed "
        "waits idle for its next command.",
        "With the cores oversubscribed by other jobs, PyTorch's OpenMP threads (which synchronise at barriers) "
        "lose far more than TensorFlow's work-stealing pool; the 1-thread rows are the like-for-like "
        "per-core comparison.",
        "Speed ratio = paired PyTorch/tfkl time per repeat; 'ratio of fastest blocks' = PyTorch's fastest block "
        "time over ours, the figure least disturbed by other jobs.",
    ]
    return {"settings": settings, "results": results, "tables": [table], "headline": headline, "notes": notes}
