"""The candidates' program: runs every part (resumable), then writes results/candidates.json, .md and the frontier.

python -m experiments.studies.candidates  # every part, resumable (hours)
python -m experiments.studies.candidates --cand_parts=attacks     # one part
python -m experiments.studies.candidates --cand_tabulate_only     # the table and the figure from what is cached
"""

import functools
import json
import os
import subprocess
import sys
import time

from absl import flags

from experiments import cells, common, runtime
from experiments.studies.candidates import (
    CANDIDATES,
    NAME,
    PARTS,
    run,
    table,
)

_PARTS = flags.DEFINE_list("cand_parts", list(PARTS), f"Parts to run, from {PARTS}.")
_NAMES = flags.DEFINE_list("cand_names", list(CANDIDATES), f"Candidates, from {list(CANDIDATES)}.")
_SEEDS = flags.DEFINE_list("cand_seeds", ["0", "1", "2"], "Seeds of the LeNet runs and of the attacked victims.")
_RUN_DIR = flags.DEFINE_string("cand_dir", "runs/candidates", "Runs and caches.")
_CELL = flags.DEFINE_string("cand_cell", None, "Internal: run one attack cell 'candidate|attack|seed' here.")
_TABULATE_ONLY = flags.DEFINE_bool("cand_tabulate_only", False, "Run nothing; tabulate the cache.")
_WORKERS = flags.DEFINE_integer(
    "cand_workers", cells.DEFAULT_WORKERS, "Attack cells run at a time, each in its own process.", lower_bound=1
)
flags.register_validator("cand_parts", lambda v: bool(v) and set(v) <= set(PARTS), f"--cand_parts: from {PARTS}")
flags.register_validator(
    "cand_names", lambda v: bool(v) and set(v) <= set(CANDIDATES), f"--cand_names: from {list(CANDIDATES)}"
)
flags.register_validator(
    "cand_seeds", lambda v: bool(v) and all(s.isdigit() for s in v), "--cand_seeds: non-negative integers"
)


def main(argv):
    del argv
    log = functools.partial(print, flush=True)
    run_dir = _RUN_DIR.value
    if _CELL.value:
        name, attack, seed, *threat = _CELL.value.split("|")
        run.run_cell(run_dir, name, attack, int(seed), threat[0] if threat else None, log=log)
        return
    seeds, names, parts = [int(s) for s in _SEEDS.value], _NAMES.value, _PARTS.value
    start = time.perf_counter()
    overhead_path = os.path.join(run_dir, "overhead.json")
    try:
        if not _TABULATE_ONLY.value:
            run.run_training(names, seeds, run_dir, [p for p in parts if p in ("lenet", "resnet")], log)
            if "attacks" in parts:
                run.run_attacks(names, seeds, run_dir, log, _WORKERS.value)
            if "overhead" in parts:
                run.measure_overhead(names, run_dir, log=log)
        training = run.run_training(names, seeds, run_dir, ("lenet", "resnet"), log, run=False)
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: {' '.join(e.cmd[2:4])} failed (exit {e.returncode}); see the log next to its root dir")
    overhead = None
    if os.path.exists(overhead_path):
        with open(overhead_path) as f:
            overhead = json.load(f)
    payload = table.tabulate(names, seeds, run_dir, training, overhead)

    try:
        path, markdown = cells.publish(NAME, payload, time.perf_counter() - start, run_dir)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    figure = os.path.join(common.FIGURES_DIR, f"{NAME}_frontier.png")
    os.makedirs(common.FIGURES_DIR, exist_ok=True)
    table.frontier_figure(payload, figure)
    print(f"wrote {path}, {markdown} and {figure}")


if __name__ == "__main__":
    runtime.run(main)
