"""Bad inputs and damaged run directories against the binaries: does each end with one clear line, and lose nothing?

  python -m experiments.perf.bad_inputs_sweep --sweep_label=after
  python -m experiments.perf.bad_inputs_sweep --sweep_label=before --sweep_tree=/tmp/before   # an older checkout

Every case runs `tff_programs.train`, `evaluate`, `attack` or `demo` from --sweep_tree on a small run (digits,
3 clients, LeNet, 2 rounds, round 2 captured), built once per label and copied per case, after damaging the
copy, and classifies what happened:
  ok                the expected end: a refusal with one `error:` line, exit 1 and every file as it was; or, where
                    the case expects the run to go on (a damaged metrics.csv, a user's backup), exit 0 with the
                    expected warning line, metrics rounds strictly 1..N and the earlier rounds' files intact
  traceback         a Python traceback (or absl's FATAL)
  accepted silently exit 0 where a refusal (or a warning) was due
  data lost         a file of the earlier rounds (or a user's file) changed or gone, metrics rounds not 1..N, or a
                    refusal that changed files
  other             anything else (no error line, several, another exit code, a timeout)
Each case's record is appended to results/bad_inputs_sweep_<label>.jsonl as it ends (a rerun skips the recorded
ones); results/bad_inputs_sweep.json and .md tabulate every label recorded, by class of case.
"""

import concurrent.futures
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import app, flags

from experiments import common
from experiments.perf import bad_inputs_cases

_TREE = flags.DEFINE_string("sweep_tree", common.REPO_ROOT, "Checkout whose binaries run (PYTHONPATH).")
_LABEL = flags.DEFINE_string("sweep_label", "after", "Name of this sweep's records (e.g. before, after).")
_WORK = flags.DEFINE_string("sweep_work", "/tmp/bad_inputs_sweep", "Scratch directory (the runs, the logs).")
_ONLY = flags.DEFINE_list("sweep_only", [], "Run only the cases whose id starts with one of these.")
_JOBS = flags.DEFINE_integer("sweep_jobs", 1, "Cases run at a time.", lower_bound=1)
_TIMEOUT = flags.DEFINE_integer("sweep_timeout", 600, "Seconds a binary may take.", lower_bound=10)
_RESULTS = flags.DEFINE_string("sweep_results", common.RESULTS_DIR, "Where the records and tables go.")

OUTCOMES = ("ok", "traceback", "accepted silently", "data lost", "other")
REWRITTEN = ("metrics.csv", "lock", "tensorboard/")  # files a resumed run rewrites (metrics: checked by rounds)


def run_binary(tree, binary, args, log, timeout, on_start=None):
    """Runs `python -m tff_programs.<binary>` from `tree` in its own process group; its exit code (None: killed
    at the timeout). `on_start(process)` runs while it does (sends it a signal, say)."""
    env = dict(os.environ, PYTHONPATH=tree, TF_CPP_MIN_LOG_LEVEL="3")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", f"tff_programs.{binary}", *args],
            cwd=tree,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if on_start:
            on_start(process)
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its TFF worker with it
        except ProcessLookupError:
            pass
        process.wait()


def file_hashes(directory):
    """Relative path -> SHA-256 of every file under `directory` (symbolic links not followed)."""
    hashes = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    hashes[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def lines_of(log):
    with open(log, errors="replace") as f:
        return [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]


def metrics_rounds(run):
    """The rounds of the run's metrics.csv rows, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(run, "metrics.csv"), newline="") as f:
            return [int(row["round"]) for row in csv.DictReader(f)]
    except (OSError, ValueError, KeyError, TypeError, csv.Error):
        return None


def build_base(tree, work):
    """The small trained run every case copies (built once per label)."""
    base = os.path.join(work, "base")
    if os.path.isfile(os.path.join(work, "base.done")):
        return base
    shutil.rmtree(base, ignore_errors=True)
    rc = run_binary(tree, "train", [f"--root_dir={base}", *bad_inputs_cases.BASE_FLAGS], base + ".log", 1800)
    if rc != 0:
        raise RuntimeError(f"the base run failed (exit {rc}): {lines_of(base + '.log')[-5:]}")
    open(os.path.join(work, "base.done"), "w").close()
    return base


def losses(before, after, case, run):
    """What an exit-0 run lost: files of the earlier rounds (or a user's) changed or gone, metrics rows."""
    lost = [
        path
        for path, digest in before.items()
        if after.get(path) != digest
        and not any(path.startswith(f"run/{p}") for p in REWRITTEN + case.may_change)
        and not path.startswith("run/manifests/")
    ]
    if case.rounds and os.path.isdir(run):
        rounds = metrics_rounds(run)
        if rounds != list(range(1, case.rounds + 1)):
            lost.append(f"metrics.csv rounds {rounds}")
    return lost


def classify(case, codes, lines, before, after, run):
    """(outcome, why) of a case from its processes' exit codes and output lines, and its files before and
    after."""
    if any("Traceback" in line or "FATAL" in line for line in lines):
        return "traceback", next(line for line in lines if "Traceback" in line or "FATAL" in line)
    errors = [line for line in lines if line.startswith("error:")]
    if None in codes:
        return "other", "timed out"
    if case.kind != "plain":
        return bad_inputs_cases.classify_special(case, codes, errors, losses(before, after, case, run))
    (rc,), expected = codes, case.expect.split("|")
    if rc == 1 and len(errors) == 1:
        if before != after:
            changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
            gone = [p for p in changed if p in before]
            return ("data lost" if gone else "other"), f"{errors[0]}; files changed: {changed[:5]}"
        return ("ok" if "refuse" in expected else "other"), errors[0]
    if rc == 0:
        lost = losses(before, after, case, run)
        if lost:
            return "data lost", f"lost: {lost[:5]}"
        warned = [line for line in lines if line.startswith(("warning:", "note:"))]
        if "accept" in expected or ("warn" in expected and warned):
            return "ok", (warned or [""])[0]
        return "accepted silently", (warned or lines or [""])[-1]
    return "other", f"exit {rc}, {len(errors)} error lines: {(errors or lines or [''])[-1]}"


def run_case(case, tree, base, work, timeout):
    """Runs one case in a fresh scratch dir; its record."""
    scratch = os.path.join(work, "cases", case.id)
    if os.path.exists(scratch):
        bad_inputs_cases.undo_immutable(scratch)
        shutil.rmtree(scratch)
    os.makedirs(scratch)
    run = os.path.join(scratch, "run")
    if case.needs_run:
        shutil.copytree(base, run, symlinks=True)
    try:
        undo = case.setup(run, scratch) if case.setup else None
    except (OSError, RuntimeError) as e:  # the damage does not apply to this tree's runs: said, not fatal
        shutil.rmtree(scratch, ignore_errors=True)
        return {"id": case.id, "class": case.cls, "outcome": "other", "why": f"set-up failed: {e}"[:400]}
    started = time.time()
    try:
        before = file_hashes(scratch)
        logs = os.path.join(work, "logs", f"{case.id}.{{}}.log")  # kept: the records cite them
        codes, lines = bad_inputs_cases.execute(case, tree, scratch, logs, timeout, run_binary, lines_of)
        after = file_hashes(scratch)
    finally:
        if undo:
            undo()
    outcome, why = classify(case, codes, lines, before, after, run)
    record = {"id": case.id, "class": case.cls, "outcome": outcome, "why": why[:400], "exit_codes": codes}
    record["seconds"] = round(time.time() - started, 1)
    bad_inputs_cases.undo_immutable(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    return record


def read_records(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["id"]: r for r in map(json.loads, f) if r}


def sweep(tree, label, work, only, jobs, timeout, results_dir):
    """Runs the cases not yet recorded under `label`, appending each record as it ends."""
    path = os.path.join(results_dir, f"bad_inputs_sweep_{label}.jsonl")
    done = read_records(path)
    cases = [c for c in bad_inputs_cases.CASES if c.id not in done and (not only or c.id.startswith(tuple(only)))]
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    base = build_base(tree, work) if any(c.needs_run for c in cases) else None
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool, open(path, "a") as records:
        futures = [pool.submit(run_case, c, tree, base, work, timeout) for c in cases]
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            records.write(json.dumps(record) + "\n")
            records.flush()
            print(f"{record['outcome']:18} {record['id']}: {record['why'][:150]}", flush=True)


def tabulate(results_dir):
    """results/bad_inputs_sweep.json and .md from every label's records: outcome counts by class of case."""
    labels = {}
    for name in sorted(os.listdir(results_dir)):
        if name.startswith("bad_inputs_sweep_") and name.endswith(".jsonl"):
            labels[name[len("bad_inputs_sweep_") : -len(".jsonl")]] = read_records(os.path.join(results_dir, name))
    classes = list(dict.fromkeys(c.cls for c in bad_inputs_cases.CASES))
    tables = {
        label: {
            cls: {o: sum(r["class"] == cls and r["outcome"] == o for r in records.values()) for o in OUTCOMES}
            for cls in classes
        }
        for label, records in labels.items()
    }
    doc = {
        "command": common.command_line(),
        "git_commit": common.git_commit(),
        "date": common.utc_now(),
        "cases": len(bad_inputs_cases.CASES),
        "tables": tables,
        "records": {label: sorted(records.values(), key=lambda r: r["id"]) for label, records in labels.items()},
    }
    common.write_json(os.path.join(results_dir, "bad_inputs_sweep.json"), doc)
    with open(os.path.join(results_dir, "bad_inputs_sweep.md"), "w") as f:
        f.write(markdown(tables))


def markdown(tables):
    """The outcome counts, a table per label (rows: classes of case)."""
    parts = ["# Bad inputs and damaged run directories: outcomes by class of case\n"]
    parts.append("`python -m experiments.perf.bad_inputs_sweep --sweep_label=LABEL [--sweep_tree=CHECKOUT]`\n")
    for label, table in tables.items():
        parts.append(f"\n## {label}\n\n| class | cases | " + " | ".join(OUTCOMES) + " |\n")
        parts.append("|---|---:|" + "---:|" * len(OUTCOMES) + "\n")
        for cls, counts in table.items():
            parts.append(f"| {cls} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |\n")
        totals = {o: sum(counts[o] for counts in table.values()) for o in OUTCOMES}
        parts.append(f"| all | {sum(totals.values())} | " + " | ".join(str(totals[o]) for o in OUTCOMES) + " |\n")
    return "".join(parts)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    tree = os.path.abspath(_TREE.value)
    work = os.path.join(os.path.abspath(_WORK.value), _LABEL.value)
    sweep(tree, _LABEL.value, work, _ONLY.value, _JOBS.value, _TIMEOUT.value, _RESULTS.value)
    tabulate(_RESULTS.value)


if __name__ == "__main__":
    app.run(main)
