"""The first attack a user runs, end to end: wall time of the attack binary before and after its start-up
fix, interleaved on the same machine.

  python -m experiments.run --only=attack_startup

Runs `python -m tff_programs.attack --attack=idlg --dataset=digits --num_images=2 --iterations=20` (all
four threats) as a fresh process, at the commit before the fix (`BEFORE`, checked out as a detached git
worktree in a temporary directory, removed after) and at this checkout, interleaved: after, before,
after (the before run takes about 8 minutes; --quick: before, after). Each run records its wall time,
the time to its first progress line, the load average around it, and its per-image metrics; every run
must give the same metrics (the same reconstructions for the same seed).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from experiments import common

BEFORE = "5a232a9"  # the tree before the start-up fix
ARGS = ["--attack=idlg", "--dataset=digits", "--num_images=2", "--iterations=20"]
TARGET_SECONDS = 60.0
ORDER = ("after", "before", "after")
QUICK_ORDER = ("before", "after")


def run_attack(tree, out_dir):
    """One run of the attack binary from `tree`: wall seconds, seconds to the first progress line, the
    1-minute load average before and after, and {threat: per-image metrics}."""
    env = dict(os.environ, PYTHONPATH=tree, TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "tff_programs.attack", *ARGS, f"--out_dir={out_dir}"]
    load_before, start, first_line = os.getloadavg()[0], time.monotonic(), None
    with subprocess.Popen(
        command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        output = []
        for line in process.stdout:
            if first_line is None and line.startswith("["):
                first_line = time.monotonic() - start
            output.append(line)
    seconds = time.monotonic() - start
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed in {tree}:\n{''.join(output[-20:])}")
    return {
        "seconds": seconds,
        "seconds_to_first_progress_line": first_line,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "per_image": per_image_metrics(out_dir),
    }


def per_image_metrics(out_dir):
    """{threat: per-image metrics} of the attack binary's metrics.json in `out_dir`."""
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return {threat: result["per_image"] for threat, result in json.load(f)["results"].items()}


def run(quick):
    order = QUICK_ORDER if quick else ORDER
    settings = {
        "command": "python -m tff_programs.attack " + " ".join(ARGS),
        "threats": ["none", "oracle", "fixed-key", "adaptive"],
        "before": BEFORE,
        "after": common.git_commit(),
        "order": list(order),
        "cores": os.cpu_count(),
    }
    runs = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="attack_startup_") as scratch:
        before_tree = os.path.join(scratch, "before")
        subprocess.run(
            ["git", "worktree", "add", "--detach", before_tree, BEFORE],
            cwd=common.REPO_ROOT,
            check=True,
            capture_output=True,
        )
        try:
            trees = {"before": before_tree, "after": common.REPO_ROOT}
            for number, name in enumerate(order):
                runs[name].append(run_attack(trees[name], os.path.join(scratch, f"{number}_{name}")))
                print(f"[attack_startup] run {number + 1}/{len(order)} ({name}): {runs[name][-1]['seconds']:.1f} s")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", before_tree], cwd=common.REPO_ROOT, check=False)
    reference = runs["before"][0]["per_image"]
    identical = all(r["per_image"] == reference for rs in runs.values() for r in rs)
    summaries = {name: common.summarize([r["seconds"] for r in rs]) for name, rs in runs.items()}
    first_lines = {
        name: common.summarize([r["seconds_to_first_progress_line"] for r in rs]) for name, rs in runs.items()
    }
    loads = [r[key] for rs in runs.values() for r in rs for key in ("load_before", "load_after")]
    after_median = summaries["after"]["median"]
    results = {
        "runs": {name: [{k: v for k, v in r.items() if k != "per_image"} for r in rs] for name, rs in runs.items()},
        "seconds": summaries,
        "seconds_to_first_progress_line": first_lines,
        "speedup": summaries["before"]["median"] / after_median,
        "identical_metrics": identical,
        "load_average_1min": common.summarize(loads),
    }
    rows = [
        [
            name,
            f"{summaries[name]['median']:.1f}",
            f"{summaries[name]['min']:.1f}",
            f"{summaries[name]['max']:.1f}",
            f"{first_lines[name]['median']:.1f}",
        ]
        for name in ("before", "after")
    ]
    return {
        "settings": settings,
        "results": results,
        "tables": [
            {
                "title": f"Attack start-up: {settings['command']} (4 threats), runs interleaved {'/'.join(order)}",
                "columns": ["tree", "median s", "min s", "max s", "s to first progress line"],
                "rows": rows,
            }
        ],
        "headline": [
            {
                "metric": "first attack (idlg, digits, 2 images, 20 iterations, 4 threats)",
                "value": round(after_median, 1),
                "unit": "s",
                "target": f"<= {TARGET_SECONDS:.0f}",
                "met": after_median <= TARGET_SECONDS,
            },
            {"metric": "speed-up over the tree before the fix", "value": round(results["speedup"], 2), "unit": "x"},
            {"metric": "same per-image metrics before and after", "value": identical, "unit": ""},
        ],
        "notes": [
            common.SHARED_MACHINE_NOTE,
            f"Load average (1 min) around the runs: median {results['load_average_1min']['median']:.1f}, "
            f"max {results['load_average_1min']['max']:.1f} on {os.cpu_count()} cores.",
        ],
    }


if __name__ == "__main__":
    common.run_as_script("attack_startup", run)
