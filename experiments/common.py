"""The convention shared by every experiment run by `python -m experiments.run` (see experiments/README.md).

A benchmark is a module of experiments/ (perf/ or studies/, named in MODULES) with either

* `run(quick: bool) -> dict` (preferred): returns a *payload* with the keys
    settings  dict of what was measured and how (sizes, repeats, flags)
    results   dict of the measured figures (any JSON-able structure)
    tables    list of {"title", "columns", "rows"} for the markdown summary/report
    headline  list of {"metric", "value", "unit", "target", "met"} (target/met optional)
    notes     list of strings (caveats, what limits a figure)
  and the runner (`python -m experiments.run`) wraps it in an *envelope* (machine, command, git
  commit, date, duration) and writes results/<name>.json; or
* `main()` run as `python -m <its module> [--quick]`: it writes results/<name>.json
  itself, ideally with `write_result(name, payload, quick)` from here so it gets the same envelope.

The measured data (results/*.json) is kept apart from what is generated from it: docs/REPORT.md and
its figures (docs/figures/*.png), which `make report` redraws at any time.
"""

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

from tfkl.files import atomic_write

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "results")
REPORT_PATH = os.path.join(REPO_ROOT, "docs", "REPORT.md")
FIGURES_DIR = os.path.join(os.path.dirname(REPORT_PATH), "figures")  # where the report looks for them
PAYLOAD_KEYS = ("settings", "results", "tables", "headline", "notes")
# Every benchmark `make bench` runs, in order; a module not (yet) in the tree is skipped with a note.
BENCHMARKS = (
    "keylock_overhead",
    "torch_compare",
    "torch_dlg_reference",
    "dlg_speed",
    "attack_startup",
    "federated_round",
    "scale",
    "attack_quality",
    "privacy_utility",
    "success_rates",
    "gradient_sharpness",
    "workers",
    "startup",
)
# Where each benchmark lives: perf/ measures speed and scale, studies/ privacy and accuracy.
STUDIES = ("attack_quality", "privacy_utility", "success_rates", "gradient_sharpness")
MODULES = {name: f"experiments.{'studies' if name in STUDIES else 'perf'}.{name}" for name in BENCHMARKS}
SHARED_MACHINE_NOTE = (
    "Measured on a shared machine (other jobs were running on the same cores): "
    "only ratios measured within one run, interleaved, are meaningful."
)


# Results recorded before experiments/ had its own room name their command `python -m benchmarks.<name>`.
_MOVED = {"run": "run", "tables": "report.tables", "figures": "report.figures", "report": "report.document"}


def module_path(folder, name):
    """The file (or package directory) of module `name` in experiments/`folder`, or None if there is neither."""
    base = os.path.join(REPO_ROOT, "experiments", folder, name)
    return next((path for path in (base + ".py", base) if os.path.exists(path)), None)


def current_command(command):
    """`command` with a module of the former benchmarks/ package named as it is now (experiments/...)."""

    def module(match):
        name = match.group(1)
        if name in _MOVED:
            return f"experiments.{_MOVED[name]}"
        return f"experiments.{'studies' if module_path('studies', name) else 'perf'}.{name}"

    return re.sub(r"\bbenchmarks\.(\w+)", module, command)


def result_path(name, results_dir=None):
    return os.path.join(results_dir or RESULTS_DIR, f"{name}.json")


def git_commit():
    """The HEAD commit of the repository, with '+dirty' if tracked files are modified."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info():
    """What the figures depend on: CPU, cores, load, Python and (if imported) framework versions."""
    info = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "shared_machine": SHARED_MACHINE_NOTE,
    }
    for module in ("tensorflow", "tensorflow_federated", "numpy"):
        if module in sys.modules:
            info[module] = getattr(sys.modules[module], "__version__", "unknown")
    return info


def utc_now():
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def command_line(argv=None):
    """The command that reproduces this run, relative to the repository root."""
    argv = sys.argv if argv is None else argv
    script = argv[0]
    if script.endswith(".py") and os.path.abspath(script).startswith(REPO_ROOT):
        module = os.path.relpath(os.path.abspath(script), REPO_ROOT)[:-3].replace(os.sep, ".")
        return shlex.join(["python", "-m", module] + list(argv[1:]))
    return shlex.join(["python"] + list(argv))


def validate_payload(name, payload):
    """Checks a `run()` payload against the convention; returns it with missing lists filled in."""
    if not isinstance(payload, dict):
        raise TypeError(f"benchmark {name!r}: run() must return a dict, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(PAYLOAD_KEYS))
    if unknown:
        raise ValueError(f"benchmark {name!r}: unknown payload keys {unknown}; allowed: {PAYLOAD_KEYS}")
    if "results" not in payload:
        raise ValueError(f"benchmark {name!r}: the payload has no 'results'")
    payload = {"settings": {}, "tables": [], "headline": [], "notes": [], **payload}
    for table in payload["tables"]:
        missing = {"title", "columns", "rows"} - set(table)
        if missing:
            raise ValueError(f"benchmark {name!r}: a table lacks {sorted(missing)}")
        for row in table["rows"]:
            if len(row) != len(table["columns"]):
                raise ValueError(
                    f"benchmark {name!r}: table {table['title']!r} has a row of {len(row)} cells "
                    f"for {len(table['columns'])} columns"
                )
    for item in payload["headline"]:
        if not {"metric", "value"} <= set(item):
            raise ValueError(f"benchmark {name!r}: a headline item needs 'metric' and 'value'")
    return payload


def envelope(name, payload, quick, command=None, duration_s=None):
    """The JSON document written for one benchmark run."""
    doc = {
        "benchmark": name,
        "command": command or command_line(),
        "git_commit": git_commit(),
        "date": utc_now(),
        "quick": bool(quick),
        "duration_s": None if duration_s is None else round(float(duration_s), 1),
        "machine": machine_info(),
    }
    doc.update(validate_payload(name, payload))
    return doc


def write_json(path, doc):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, binary=False) as f:
        json.dump(doc, f, indent=2, sort_keys=False, default=json_default)
        f.write("\n")


def json_default(value):
    if hasattr(value, "tolist"):  # NumPy arrays and scalars
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_result(name, payload, quick, results_dir=None, command=None, duration_s=None):
    """Writes results/<name>.json (envelope + payload); returns its path."""
    path = result_path(name, results_dir)
    write_json(path, envelope(name, payload, quick, command, duration_s))
    return path


def run_as_script(name, run):
    """Entry point of a benchmark module run directly: `python -m <its module> [--quick]` times
    `run(quick)` and writes its result (what experiments.run does for it otherwise)."""
    quick = "--quick" in sys.argv[1:]
    start = time.time()
    payload = run(quick)
    write_result(name, payload, quick, duration_s=time.time() - start)


def load_results(results_dir=None):
    """All result JSONs in `results_dir`, as {file stem: document}, sorted by name."""
    results_dir = results_dir or RESULTS_DIR
    docs = {}
    if not os.path.isdir(results_dir):
        return docs
    for filename in sorted(os.listdir(results_dir)):
        if filename.endswith(".json"):
            with open(os.path.join(results_dir, filename)) as f:
                try:
                    docs[filename[:-5]] = json.load(f)
                except json.JSONDecodeError as e:
                    docs[filename[:-5]] = {"error": f"unreadable JSON: {e}"}
    return docs


def summarize(values):
    """Median, quartiles, min, max and count of a list of numbers (for timing spreads)."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {
        "median": float(median),
        "q1": float(q1),
        "q3": float(q3),
        "min": float(values.min()),
        "max": float(values.max()),
        "n": int(values.size),
    }


def interleaved_timings(steps_by_variant, repeats, steps_per_block, warmup_steps, rng):
    """Per-variant lists of seconds per call: after `warmup_steps` calls each, blocks of `steps_per_block`
    calls, the variants in a random order each repeat (a shared machine's drift falls on all of them).
    A step returns a tensor or array; the last one of a block is fetched, so the work is done."""
    import numpy as np

    for step in steps_by_variant.values():
        for _ in range(warmup_steps):
            np.asarray(step())
    times = {name: [] for name in steps_by_variant}
    for _ in range(repeats):
        for name in rng.permutation(list(steps_by_variant)):
            start = time.perf_counter()
            for _ in range(steps_per_block):
                out = steps_by_variant[name]()
            np.asarray(out)
            times[name].append((time.perf_counter() - start) / steps_per_block)
    return times
