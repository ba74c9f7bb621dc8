"""Start-up of the binaries: wall time and exit code of `--help` and of a bad flag, per binary.

  python -m experiments.perf.startup [--quick] [--baseline=DIR]

Each command runs in a fresh interpreter (`python -m tff_programs.<binary>`), as a user types it; the target is
an answer in under 2 s, before TensorFlow loads, and exit code 0 for --help. With --baseline=DIR (an older
checkout, e.g. `git archive 5a232a9 | tar -x -C DIR`) the same commands also run in that tree, interleaved.
"""

import os
import subprocess
import sys
import time

from experiments import common

BINARIES = ("train", "evaluate", "attack", "demo", "train_central", "worker")
COMMANDS = {"--help": ["--help"], "bad flag": ["--no_such_flag=1"]}
TARGET_SECONDS = 2.0


def _time_command(tree, binary, args):
    """(seconds, exit code, stderr lines) of one run of the binary in the checkout `tree`."""
    env = dict(os.environ, PYTHONPATH=tree, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", f"tff_programs.{binary}", *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return time.perf_counter() - start, completed.returncode, len(completed.stderr.splitlines())


def run(quick, baseline_dir=None):
    repeats = 1 if quick else 3
    trees = {"after": common.REPO_ROOT, **({"before": os.path.abspath(baseline_dir)} if baseline_dir else {})}
    results = {label: {} for label in trees}
    for binary in BINARIES:
        for command, args in COMMANDS.items():
            runs = {label: [] for label in trees}
            for _ in range(repeats):
                for label, tree in trees.items():  # interleaved, so load changes hit both alike
                    runs[label].append(_time_command(tree, binary, args))
            for label, measured in runs.items():
                results[label].setdefault(binary, {})[command] = {
                    "seconds": common.summarize([m[0] for m in measured])["median"],
                    "exit_code": measured[-1][1],
                    "stderr_lines": measured[-1][2],
                }
    columns = ["binary", "command"]
    for label in trees:
        columns += [f"{label}: s", f"{label}: exit code", f"{label}: stderr lines"]
    rows = []
    for binary in BINARIES:
        for command in COMMANDS:
            row = [binary, command]
            for label in trees:
                entry = results[label][binary][command]
                row += [round(entry["seconds"], 2), entry["exit_code"], entry["stderr_lines"]]
            rows.append(row)
    after = results["after"]
    slowest = max(entry["seconds"] for by_command in after.values() for entry in by_command.values())
    return {
        "settings": {
            "binaries": list(BINARIES),
            "commands": COMMANDS,
            "repeats": repeats,
            "statistic": "median wall time of a fresh `python -m tff_programs.<binary> ...`",
            "baseline_dir": baseline_dir,
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"),
        },
        "results": results,
        "tables": [{"title": "Start-up of the binaries: --help and a bad flag", "columns": columns, "rows": rows}],
        "headline": [
            {
                "metric": "slowest --help or bad-flag answer",
                "value": round(slowest, 2),
                "unit": "s",
                "target": f"< {TARGET_SECONDS:g}",
                "met": slowest < TARGET_SECONDS,
            },
            {
                "metric": "binaries whose --help exits 0",
                "value": sum(after[b]["--help"]["exit_code"] == 0 for b in BINARIES),
                "unit": f"of {len(BINARIES)}",
                "target": len(BINARIES),
                "met": all(after[b]["--help"]["exit_code"] == 0 for b in BINARIES),
            },
        ],
        "notes": [common.SHARED_MACHINE_NOTE],
    }


def main():
    quick = "--quick" in sys.argv[1:]
    baseline = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--baseline=")), None)
    start = time.time()
    payload = run(quick, baseline)
    common.write_result("startup", payload, quick, duration_s=time.time() - start)


if __name__ == "__main__":
    main()
