"""The console scripts (pyproject.toml): each runs its binary exactly as `python -m tff_programs.<name>` does.

Run as `__main__`, a binary's --help shows its docstring and flags: absl lists the flags of the module named by
sys.argv[0], which an imported `main` would not be.
"""

import runpy


def _run_binary(name):
    runpy.run_module(f"tff_programs.{name}", run_name="__main__", alter_sys=True)


def train():
    """tfkl-train: federated FedKL / FedAvg training (tff_programs.train)."""
    _run_binary("train")


def evaluate():
    """tfkl-evaluate: the key evaluation matrix of a run (tff_programs.evaluate)."""
    _run_binary("evaluate")


def attack():
    """tfkl-attack: gradient inversion under the threat models (tff_programs.attack)."""
    _run_binary("attack")


def demo():
    """tfkl-demo: the main job, `make demo` (tff_programs.demo)."""
    _run_binary("demo")


def worker():
    """tfkl-worker: a remote TFF worker (tff_programs.worker)."""
    _run_binary("worker")


def train_central():
    """tfkl-train-central: the centralised baseline (tff_programs.train_central)."""
    _run_binary("train_central")
