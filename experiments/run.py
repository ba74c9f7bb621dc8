"""Runs the benchmarks (experiments/perf and studies), writes results/<name>.json each, regenerates the summary table.

  python -m experiments.run                       # everything present (what `make bench` runs)
  python -m experiments.run --only=keylock_overhead,torch_compare --quick   # -> runs/bench_quick/

Each benchmark runs in a fresh Python process (its log goes to runs/bench_logs/<name>.log), so a
crash or a framework's global state cannot affect the next one. Benchmarks whose module is not in
the tree yet are skipped with a note. See experiments/README.md for the module convention.
"""

import importlib
import os
import subprocess
import sys
import time

from absl import app, flags

from experiments import common
from experiments.report import tables

QUICK_RESULTS_DIR = os.path.join(common.REPO_ROOT, "runs", "bench_quick")
# experiments.report.figures and .document define the same flag; allow_override lets one process import all three.
_RESULTS_DIR = flags.DEFINE_string(
    "results_dir", common.RESULTS_DIR, "Where the result JSONs and their summary go.", allow_override=True
)
_ONLY = flags.DEFINE_list("only", [], "Benchmarks to run (default: all of experiments.common.BENCHMARKS).")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke-size settings: checks that everything runs, figures are rough.")
_ISOLATE = flags.DEFINE_bool("isolate", True, "Run each benchmark in its own subprocess (--noisolate: in this one).")
_LOG_DIR = flags.DEFINE_string(
    "bench_log_dir",
    os.path.join(common.REPO_ROOT, "runs", "bench_logs"),
    "Where each isolated benchmark's output goes.",
)
_TIMEOUT = flags.DEFINE_integer("timeout_s", 7200, "Time limit of one benchmark, seconds.", lower_bound=1)


def _known(name):
    return name in common.BENCHMARKS or module_present(name)


flags.register_validator(
    "only",
    lambda names: all(_known(n) for n in names),
    f"--only takes benchmark names from {', '.join(common.BENCHMARKS)} (or a module in experiments/perf or studies)",
)


def module_name(name):
    """The module of benchmark `name`: common.MODULES', else experiments/perf/ or experiments/studies/ by file."""
    if name in common.MODULES:
        return common.MODULES[name]
    for folder in ("perf", "studies"):
        if common.module_path(folder, name):
            return f"experiments.{folder}.{name}"
    return f"experiments.perf.{name}"


def module_file(name):
    """Benchmark `name`'s module file, or its package's directory."""
    _, folder, module = module_name(name).split(".")
    return common.module_path(folder, module) or os.path.join(common.REPO_ROOT, "experiments", folder, f"{module}.py")


def module_present(name):
    """True if benchmark `name`'s module file (or package) exists (without importing it)."""
    return common.module_path(*module_name(name).split(".")[1:]) is not None


def run_in_process(name, quick, results_dir, command):
    """Runs one benchmark here: `run(quick)` and the runner writes the JSON, or the module's own main()."""
    module = importlib.import_module(module_name(name))
    start = time.monotonic()
    if hasattr(module, "run"):
        payload = module.run(quick)
        return common.write_result(name, payload, quick, results_dir, command, time.monotonic() - start)
    if hasattr(module, "main"):
        return run_main_module(name, quick, results_dir)
    raise AttributeError(f"{module_name(name)} has neither run(quick) nor main(); see experiments/README.md")


def run_main_module(name, quick, results_dir):
    """Runs `python -m <the module> [--quick]`, which must write its own result JSON."""
    path = common.result_path(name, results_dir)
    before = os.path.getmtime(path) if os.path.exists(path) else None
    subprocess.run(
        [sys.executable, "-m", module_name(name)] + (["--quick"] if quick else []),
        cwd=common.REPO_ROOT,
        check=True,
        env=child_env(),
    )
    if not os.path.exists(path) or os.path.getmtime(path) == before:
        raise RuntimeError(f"{module_name(name)} ran but did not write {path}")
    return path


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = common.REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def reproduce_command(name, quick):
    return f"python -m experiments.run --only={name}" + (" --quick" if quick else "")


def run_isolated(name, quick, results_dir, log_dir, timeout_s):
    """Runs one benchmark in a subprocess; returns (status, detail)."""
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{name}.log")
    argv = [
        sys.executable,
        "-m",
        "experiments.run",
        f"--only={name}",
        "--noisolate",
        f"--results_dir={results_dir}",
    ] + (["--quick"] if quick else [])
    with open(log_path, "w") as log:
        try:
            completed = subprocess.run(
                argv, cwd=common.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=child_env(), timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            return "failed", f"timed out after {timeout_s} s (log: {log_path})"
    if completed.returncode:
        return "failed", f"exit code {completed.returncode} (log: {log_path})"
    return "ok", common.result_path(name, results_dir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    names = _ONLY.value or list(common.BENCHMARKS)
    results_dir = _RESULTS_DIR.value
    if _QUICK.value and not _RESULTS_DIR.present:
        results_dir = QUICK_RESULTS_DIR  # smoke figures never overwrite the committed ones
    statuses = []
    for name in names:
        if not module_present(name):
            statuses.append(
                (name, "skipped", f"{os.path.relpath(module_file(name), common.REPO_ROOT)} is not in the tree yet")
            )
            continue
        print(f"[bench] {name} ...", flush=True)
        start = time.monotonic()
        if _ISOLATE.value:
            status, detail = run_isolated(name, _QUICK.value, results_dir, _LOG_DIR.value, _TIMEOUT.value)
        else:
            status, detail = (
                "ok",
                run_in_process(name, _QUICK.value, results_dir, reproduce_command(name, _QUICK.value)),
            )
        statuses.append((name, status, f"{detail} ({time.monotonic() - start:.0f} s)"))
        print(f"[bench] {name}: {status}: {statuses[-1][2]}", flush=True)
    summary = tables.write_summary(results_dir)
    print(tables.markdown_table(["benchmark", "status", "detail"], statuses))
    print(f"summary: {summary}")
    if any(status == "failed" for _, status, _ in statuses):
        sys.exit(1)


if __name__ == "__main__":
    if "--noisolate" in sys.argv[1:]:
        # Keras 2.14 functional models fail to build (Flatten sees eager execution) when TensorFlow is
        # first imported inside absl's main(); import it before app.run for in-process benchmarks.
        import tensorflow  # noqa: F401
    app.run(main)
