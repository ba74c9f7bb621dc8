"""The attack binary's compile cost, before and after a change, interleaved on the same machine.

  python -m experiments.perf.attack_compile [--attack_compile_before=COMMIT] [--attack_compile_repeats=3]

Runs `python -m tff_programs.attack --attack=idlg --dataset=digits --num_images=2 --iterations=20` (all four
threats) as a fresh process at COMMIT (a detached git worktree in a temporary directory, removed after) and at
this checkout, alternating which goes first (before/after, after/before, ...) so that other load falls on
both. Each run records its wall and CPU seconds (the child's user + system time, less sensitive to other load
than the wall time), the 1-minute load average around it and its per-image metrics. Then the IG and GRNN
binaries run once per tree (20 iterations, threats 'none' and 'adaptive', one restart): every run of one attack
must give the same per-image metrics.
Writes results/attack_compile.json.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments import common
from experiments.perf import attack_startup

_BEFORE = flags.DEFINE_string("attack_compile_before", "ea45c14", "The commit to compare this checkout with.")
_REPEATS = flags.DEFINE_integer("attack_compile_repeats", 3, "Timed runs per tree.", lower_bound=1)
_CHECKED = flags.DEFINE_list("attack_compile_checked", ["ig", "grnn"], "Attacks run once per tree for their metrics.")
_QUICK = flags.DEFINE_bool("quick", False, "One timed run per tree, no other attack checked.")

COMMON_ARGS = ["--dataset=digits", "--num_images=2", "--iterations=20"]
TIMED_ATTACK = "idlg"
CHECK_ARGS = ["--threat=none,adaptive", "--restarts=1"]  # the checked attacks: both kinds of structure, cheaper


def run_binary(tree, attack, out_dir):
    """One run of the attack binary from `tree`: wall and CPU seconds, load before/after, per-image metrics."""
    env = dict(os.environ, PYTHONPATH=tree, TF_CPP_MIN_LOG_LEVEL="2")
    args = [f"--attack={attack}", *COMMON_ARGS, *([] if attack == TIMED_ATTACK else CHECK_ARGS)]
    command = [sys.executable, "-m", "tff_programs.attack", *args, f"--out_dir={out_dir}"]
    load_before, start = os.getloadavg()[0], time.monotonic()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed in {tree}:\n{process.stderr[-3000:]}")
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "per_image": attack_startup.per_image_metrics(out_dir),
    }


def measure(trees, scratch, repeats, checked):
    """{attack: {'before': [runs], 'after': [runs]}}: the timed attack `repeats` times per tree, alternating
    which tree goes first, then each checked attack once per tree."""
    runs = {attack: {"before": [], "after": []} for attack in (TIMED_ATTACK, *checked)}
    plan = [(TIMED_ATTACK, ("before", "after") if i % 2 == 0 else ("after", "before")) for i in range(repeats)]
    plan += [(attack, ("before", "after")) for attack in checked]
    for number, (attack, order) in enumerate(plan):
        for name in order:
            record = run_binary(trees[name], attack, os.path.join(scratch, f"{number}_{attack}_{name}"))
            runs[attack][name].append(record)
            print(
                f"[attack_compile] {attack} {name}: {record['seconds']:.1f} s, {record['cpu_seconds']:.1f} s CPU, "
                f"load {record['load_before']:.1f} -> {record['load_after']:.1f}",
                flush=True,
            )
    return runs


def payload(runs, before, repeats):
    """The benchmark's payload (see experiments.common) from `measure`'s runs."""
    timed = runs[TIMED_ATTACK]
    seconds = {name: common.summarize([r["seconds"] for r in rs]) for name, rs in timed.items()}
    cpu = {name: common.summarize([r["cpu_seconds"] for r in rs]) for name, rs in timed.items()}
    loads = [r[k] for rs in timed.values() for r in rs for k in ("load_before", "load_after")]
    identical = {
        attack: all(r["per_image"] == by_tree["before"][0]["per_image"] for rs in by_tree.values() for r in rs)
        for attack, by_tree in runs.items()
    }
    results = {
        "runs": {
            attack: {name: [{k: v for k, v in r.items() if k != "per_image"} for r in rs] for name, rs in by.items()}
            for attack, by in runs.items()
        },
        "seconds": seconds,
        "cpu_seconds": cpu,
        "wall_ratio": seconds["before"]["median"] / seconds["after"]["median"],
        "cpu_ratio": cpu["before"]["median"] / cpu["after"]["median"],
        "identical_metrics": identical,
        "load_average_1min": common.summarize(loads),
    }
    command = f"python -m tff_programs.attack --attack={TIMED_ATTACK} " + " ".join(COMMON_ARGS)
    rows = [
        [name, f"{seconds[name]['median']:.1f}", f"{seconds[name]['min']:.1f}", f"{cpu[name]['median']:.1f}"]
        for name in ("before", "after")
    ]
    return {
        "settings": {
            "command": command,
            "checked": {attack: CHECK_ARGS for attack in runs if attack != TIMED_ATTACK},
            "before": before,
            "after": common.git_commit(),
            "repeats": repeats,
        },
        "results": results,
        "tables": [
            {
                "title": f"Attack compile cost: {command} (4 threats), runs interleaved",
                "columns": ["tree", "median s", "min s", "median CPU s"],
                "rows": rows,
            }
        ],
        "headline": [
            {"metric": "idlg first attack, after (median wall)", "value": round(seconds["after"]["median"], 1)},
            {"metric": "wall speed-up over the tree before", "value": round(results["wall_ratio"], 2), "unit": "x"},
            {"metric": "CPU speed-up over the tree before", "value": round(results["cpu_ratio"], 2), "unit": "x"},
            {"metric": "same per-image metrics before and after", "value": all(identical.values()), "unit": ""},
        ],
        "notes": [
            common.SHARED_MACHINE_NOTE,
            f"Load average (1 min) around the timed runs: median {results['load_average_1min']['median']:.1f}, "
            f"max {results['load_average_1min']['max']:.1f} on {os.cpu_count()} cores.",
        ],
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    start, repeats = time.time(), 1 if _QUICK.value else _REPEATS.value
    with tempfile.TemporaryDirectory(prefix="attack_compile_") as scratch:
        before_tree = os.path.join(scratch, "before")
        subprocess.run(
            ["git", "worktree", "add", "--detach", before_tree, _BEFORE.value],
            cwd=common.REPO_ROOT,
            check=True,
            capture_output=True,
        )
        try:
            trees = {"before": before_tree, "after": common.REPO_ROOT}
            runs = measure(trees, scratch, repeats, () if _QUICK.value else tuple(_CHECKED.value))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", before_tree], cwd=common.REPO_ROOT, check=False)
    result = payload(runs, _BEFORE.value, repeats)
    path = common.write_result("attack_compile", result, _QUICK.value, duration_s=time.time() - start)
    print(json.dumps(result["headline"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
