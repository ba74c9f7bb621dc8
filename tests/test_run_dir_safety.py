"""A run directory has one writer at a time, and nonsense is refused before any work: one `error:` line, exit
code 1, no traceback, every file of the run unchanged.

The flag cases run without TensorFlow (validated before it loads); the cases on a run copy one small trained
run (digits, 2 clients, 2 rounds) prepared once per module, and are marked slow with the writers' race and
the SIGINT test.
"""

import concurrent.futures
import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.helpers import finish, start_binary
from tests.test_bad_inputs import RUN_FLAGS, file_hashes, run_binary, set_immutable

JOBS = int(os.environ.get("TFKL_TEST_JOBS", "2"))
NEW = "--root_dir={tmp}/new"
THREE = "--num_clients=3"


def make_file(run, tmp):
    with open(os.path.join(tmp, "file"), "w") as f:
        f.write("not a directory")


def make_training_run(run, tmp):
    os.makedirs(run)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"algorithm": "fedkl"}, f)


def read_only_dir(run, tmp):
    os.makedirs(os.path.join(tmp, "ro"))
    set_immutable(os.path.join(tmp, "ro"), True)
    return lambda: set_immutable(os.path.join(tmp, "ro"), False)


def config_holds(value):
    def setup(run, tmp):
        with open(os.path.join(run, "config.json"), "w") as f:
            json.dump(value, f)

    return setup


def replace_by_file(name):
    def setup(run, tmp):
        shutil.rmtree(os.path.join(run, name))
        with open(os.path.join(run, name), "w") as f:
            f.write("not a directory")

    return setup


def unbind_and_swap_key(run, tmp):
    """config.json without its run_id, client 1's key copied over client 0's."""
    path = os.path.join(run, "config.json")
    with open(path) as f:
        config = json.load(f)
    del config["run_id"]
    with open(path, "w") as f:
        json.dump(config, f)
    shutil.copy(os.path.join(run, "clients", "1", "key"), os.path.join(run, "clients", "0", "key"))


def metrics_directory(run, tmp):
    os.remove(os.path.join(run, "metrics.csv"))
    os.makedirs(os.path.join(run, "metrics.csv", "old"))


def make_demo_run(run, tmp):
    """What tff_programs.demo leaves under its --root_dir: a training run per algorithm."""
    os.makedirs(os.path.join(tmp, "demo", "fedkl"))
    with open(os.path.join(tmp, "demo", "fedkl", "config.json"), "w") as f:
        json.dump({"algorithm": "fedkl"}, f)


def rebind_run_id(run, tmp):
    """config.json with another run_id (which its keys name: a run's keys rebound to another)."""
    path = os.path.join(run, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, "run_id": "0" * 16}, f, indent=1)


def append_byte(name):
    def setup(run, tmp):
        with open(os.path.join(run, name), "ab") as f:
            f.write(b"x")

    return setup


def flip_byte(name):
    """The byte in the middle of the file flipped: the same size, other content."""

    def setup(run, tmp):
        with open(os.path.join(run, name), "r+b") as f:
            f.seek(os.path.getsize(os.path.join(run, name)) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))

    return setup


def delete(name):
    return lambda run, tmp: os.remove(os.path.join(run, name))


def cut_to_half(name):
    return lambda run, tmp: truncate(os.path.join(run, name), lambda data: len(data) // 2)


def drop_metrics_copies(run):
    """The run's manifests as written before they held metrics.csv's text (nothing to rewrite it from)."""
    for name in os.listdir(os.path.join(run, "manifests")):
        path = os.path.join(run, "manifests", name)
        with open(path) as f:
            manifest = json.load(f)
        del manifest["metrics"]
        with open(path, "w") as f:
            json.dump(manifest, f)


def immutable(name):
    """The run's file or directory `name` made read-only (chattr +i as root)."""

    def setup(run, tmp):
        set_immutable(os.path.join(run, name), True)
        return lambda: set_immutable(os.path.join(run, name), False)

    return setup


def cut_metrics_without_copies(run, tmp):
    drop_metrics_copies(run)
    cut_to_half("metrics.csv")(run, tmp)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    binary: str
    args: tuple  # {run}: the case's run dir (a copy of the trained run if it needs one), {tmp}: its scratch dir
    expect: str  # a part of the error line
    setup: object = None  # makes the case's files; returns an undo callable or None

    @property
    def needs_run(self):
        return any("{run}" in a for a in self.args) and self.setup is not make_training_run


def flag_case(flag, expect, *extra):
    name = flag.lstrip("-").replace("=", "-").replace("_", "-").replace(":", "-").replace(",", "-")
    return Case(f"train-{name}", "train", (NEW, *extra, flag), expect)


FLAG_CASES = [
    flag_case("--learning_rate=inf", "learning_rate must be positive and finite"),
    flag_case("--learning_rate=nan", "learning_rate must be positive and finite"),
    flag_case("--learning_rate=-inf", "learning_rate must be positive and finite"),
    flag_case("--learning_rate=0", "learning_rate must be positive and finite"),
    flag_case("--server_learning_rate=0", "server_learning_rate must be positive"),
    flag_case("--server_learning_rate=inf", "server_learning_rate must be positive and finite"),
    flag_case("--lr_gamma=0", "lr_gamma must be positive"),
    flag_case("--lr_gamma=nan", "lr_gamma must be positive"),
    flag_case("--alpha=nan", "alpha must be positive"),
    flag_case("--alpha=-1", "alpha must be positive"),
    flag_case("--momentum=inf", "momentum must not be negative, and be finite"),
    flag_case("--weight_decay=-1", "weight_decay must not be negative"),
    flag_case("--weight_decay=nan", "weight_decay must not be negative"),
    flag_case("--dp_noise_multiplier=nan", "dp_noise_multiplier must not be negative"),
    flag_case("--random_key_penalty=inf", "random_key_penalty must not be negative, and be finite"),
    flag_case("--dp_clip=0", "dp_clip must be positive"),
    flag_case("--dp_clip=inf", "dp_clip must be positive and finite"),
    flag_case("--prune_fraction=nan", "prune_fraction must not be negative"),
    flag_case("--clients_per_round=0", "clients_per_round must be at least 1"),
    flag_case("--clients_per_round=-2", "clients_per_round must be at least 1"),
    flag_case("--local_epochs=0", "local_epochs must be at least 1"),
    flag_case("--num_clients=-1", "num_clients must be at least 1"),
    flag_case("--lr_milestones=-5", "--lr_milestones must be a list of round numbers (>= 1)"),
    flag_case("--lr_milestones=0", "--lr_milestones must be a list of round numbers (>= 1)"),
    flag_case("--lr_milestones=10,-20", "--lr_milestones must be a list of round numbers (>= 1)"),
    flag_case("--capture_rounds=-1", "--capture_rounds must be 'all' or a list of round numbers (>= 1)"),
    flag_case("--capture_rounds=0", "--capture_rounds must be 'all' or a list of round numbers (>= 1)"),
    flag_case("--inject_nan=1:9", "--inject_nan=1:9 names no round and client of this run", THREE),
    flag_case("--inject_nan=1:3", "clients 0..2", THREE),
    flag_case("--inject_failure=2:5", "--inject_failure=2:5 names no round and client", THREE),
    flag_case("--inject_nan=0:0", "--inject_nan=0:0 names no round and client", THREE),
    flag_case("--rounds=-3", "--rounds"),
    flag_case("--keep_rounds=-1", "--keep_rounds"),
    Case("train-root-dir-under-a-file", "train", ("--root_dir={tmp}/file/run",), "is a file", make_file),
    Case("train-root-dir-in-proc", "train", ("--root_dir=/proc/tfkl-run",), "cannot write in /proc"),
    Case("train-root-dir-read-only", "train", ("--root_dir={tmp}/ro/run",), "cannot create", read_only_dir),
    Case("evaluate-out-is-a-directory", "evaluate", ("--root_dir={tmp}", "--out={tmp}"), "is a directory"),
    Case(
        "evaluate-out-under-a-file", "evaluate", ("--root_dir={tmp}", "--out={tmp}/file/e.json"), "is a file", make_file
    ),
    Case("evaluate-out-in-proc", "evaluate", ("--root_dir={tmp}", "--out=/proc/e.json"), "cannot write in /proc"),
    Case(
        "evaluate-out-read-only",
        "evaluate",
        ("--root_dir={tmp}", "--out={tmp}/ro/e.json"),
        "cannot write",
        read_only_dir,
    ),
    Case("evaluate-public-sizes-negative", "evaluate", ("--root_dir={tmp}", "--public_sizes=-5"), "positive integers"),
    Case("evaluate-round-negative", "evaluate", ("--root_dir={tmp}", "--round=-1"), "--round"),
    Case("evaluate-recovery-steps-zero", "evaluate", ("--root_dir={tmp}", "--recovery_steps=0"), "--recovery_steps"),
    Case("demo-root-dir-in-proc", "demo", ("--root_dir=/proc/tfkl-demo",), "cannot write in /proc"),
    Case("demo-root-dir-a-file", "demo", ("--root_dir={tmp}/file",), "is a file", make_file),
    Case("demo-on-a-training-run", "demo", ("--root_dir={run}",), "holds a training run", make_training_run),
    Case("demo-rounds-negative", "demo", ("--rounds=-1",), "--rounds"),
    Case(
        "train-on-a-demo-run", "train", ("--root_dir={tmp}/demo",), "holds the runs of tff_programs.demo", make_demo_run
    ),
    Case("attack-out-dir-in-proc", "attack", ("--out_dir=/proc/tfkl-attack",), "cannot write in /proc"),
    Case("attack-out-dir-a-file", "attack", ("--out_dir={tmp}/file",), "is a file", make_file),
    Case("attack-out-dir-under-a-file", "attack", ("--out_dir={tmp}/file/out",), "is a file", make_file),
    Case("attack-out-dir-read-only", "attack", ("--out_dir={tmp}/ro/out",), "cannot create", read_only_dir),
]
RESUME = ("--root_dir={run}", "--rounds=3", *RUN_FLAGS)
RUN_CASES = [
    Case("train-config-a-list", "train", RESUME, "not a JSON object", config_holds([])),
    Case("train-config-null", "train", RESUME, "not a JSON object", config_holds(None)),
    Case("train-config-a-string", "train", RESUME, "not a JSON object", config_holds("fedkl")),
    Case("train-config-a-number", "train", RESUME, "not a JSON object", config_holds(3)),
    Case("evaluate-config-a-list", "evaluate", ("--root_dir={run}",), "config.json", config_holds([])),
    Case("evaluate-config-null", "evaluate", ("--root_dir={run}",), "config.json", config_holds(None)),
    Case("train-metrics-a-directory", "train", RESUME, "metrics.csv is a directory", metrics_directory),
    Case("train-clients-a-file", "train", RESUME, "clients is not a directory", replace_by_file("clients")),
    Case("train-server-a-file", "train", RESUME, "server is not a directory", replace_by_file("server")),
    Case(
        "evaluate-clients-a-file", "evaluate", ("--root_dir={run}",), "is not a directory", replace_by_file("clients")
    ),
    Case("train-key-unbound-and-swapped", "train", RESUME, "lacks its run_id", unbind_and_swap_key),
    Case(
        "evaluate-key-unbound-and-swapped", "evaluate", ("--root_dir={run}",), "lacks its run_id", unbind_and_swap_key
    ),
    # Files that do not match the manifest of the round a run resumes from (round 2).
    Case(
        "train-client-state-tampered",
        "train",
        RESUME,
        "clients/0/state_00002.npz does not match the manifest of round 2",
        flip_byte("clients/0/state_00002.npz"),
    ),
    Case(
        "train-client-state-grown",
        "train",
        RESUME,
        "clients/1/state_00002.npz does not match the manifest of round 2",
        append_byte("clients/1/state_00002.npz"),
    ),
    Case(
        "train-client-state-deleted",
        "train",
        RESUME,
        "clients/0/state_00002.npz does not match the manifest of round 2",
        delete("clients/0/state_00002.npz"),
    ),
    Case(
        "train-key-tampered",
        "train",
        RESUME,
        "clients/1/key does not match the manifest of round 2",
        flip_byte("clients/1/key"),
    ),
    Case(
        "train-server-file-deleted",
        "train",
        RESUME,
        "program_state_2/variables/variables.index does not match the manifest of round 2",
        delete("server/program_state_2/variables/variables.index"),
    ),
    Case(
        "train-server-file-tampered",
        "train",
        RESUME,
        "or resume from round 1 (its files are intact): delete program_state_2 in",
        flip_byte("server/program_state_2/saved_model.pb"),
    ),
    Case(
        "train-client-cache-truncated",
        "train",
        RESUME,
        "client_data/client_0.tfrecord does not match the manifest of round 2",
        cut_to_half("client_data/client_0.tfrecord"),
    ),
    Case("train-config-tampered", "train", RESUME, "config.json does not match the manifest", rebind_run_id),
    Case(
        "train-metrics-truncated-no-copy",
        "train",
        RESUME,
        "metrics.csv does not match the manifest of round 2",
        cut_metrics_without_copies,
    ),
    *(
        Case(f"train-read-only-{name.replace('/', '-')}", "train", RESUME, f"run/{name}: ", immutable(name))
        for name in ("metrics.csv", "clients", "clients/1", "server", "manifests", "tensorboard")
    ),
    Case(
        "train-manifest-unreadable",
        "train",
        RESUME,
        "manifest_00002.json is unreadable",
        cut_to_half("manifests/manifest_00002.json"),
    ),
]
CASES = FLAG_CASES + RUN_CASES
assert len({c.id for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One small trained FedKL run (digits, 2 clients, 2 rounds), for copies only."""
    root = str(tmp_path_factory.mktemp("trained") / "run")
    rc = run_binary("train", [f"--root_dir={root}", "--rounds=2", *RUN_FLAGS], root + ".log")
    with open(root + ".log") as f:
        assert rc == 0, f.read()[-2000:]
    return root


def run_case(case, trained, base):
    """Runs `case` in `base`/tmp; (exit code, output lines, the files under `base`/tmp before and after)."""
    tmp, log = os.path.join(base, "tmp"), os.path.join(base, "log")
    run = os.path.join(tmp, "run")
    os.makedirs(tmp)
    if case.needs_run:
        shutil.copytree(trained, run)
    undo = case.setup(run, tmp) if case.setup else None
    try:
        before = file_hashes(tmp)
        rc = run_binary(case.binary, [a.format(run=run, tmp=tmp) for a in case.args], log)
        after = file_hashes(tmp)
    finally:
        if undo:
            undo()
    return rc, lines_of(log), before, after


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """The outcome of every selected case, `JOBS` at a time (the trained run first, if a case needs it)."""
    selected = [item.callspec.params["case"] for item in request.session.items if item.originalname == "test_refused"]
    trained = request.getfixturevalue("trained_run") if any(c.needs_run for c in selected) else None
    base = tmp_path_factory.mktemp("cases")
    with concurrent.futures.ThreadPoolExecutor(JOBS) as pool:
        return {c.id: pool.submit(run_case, c, trained, str(base / c.id)) for c in selected}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c.needs_run else c for c in CASES], ids=[c.id for c in CASES]
)
def test_refused(case, outcomes):
    rc, lines, before, after = outcomes[case.id].result()
    errors = [line for line in lines if line.startswith("error:")]
    assert rc == 1, lines
    assert len(errors) == 1 and case.expect in errors[0], lines
    assert not any("Traceback" in line or "FATAL" in line for line in lines), lines
    assert before == after, lines


def test_there_are_at_least_50_cases():
    assert len(CASES) >= 50


def metrics_rounds(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return [int(row["round"]) for row in csv.DictReader(f)]


def start_train(run, log, *extra):
    return start_binary("tff_programs.train", f"--root_dir={run}", *extra, log=log)


def lines_of(log):
    with open(log) as f:
        return [line for line in f.read().splitlines() if line.strip()]


RACE_FLAGS = ("--dataset=digits", "--num_clients=3", "--model=lenet", "--rounds=4", "--key_dim=16")


@pytest.mark.slow
def test_two_writers_one_is_refused_naming_the_other(tmp_path):
    run = str(tmp_path / "run")
    logs = [str(tmp_path / f"train{i}.log") for i in range(2)]
    processes = [start_train(run, log, *RACE_FLAGS) for log in logs]
    codes = [finish(p, 600) for p in processes]
    assert sorted(codes) == [0, 1], [lines_of(log) for log in logs]
    winner, loser = (processes[0], logs[1]) if codes[0] == 0 else (processes[1], logs[0])
    lines = lines_of(loser)
    assert len(lines) == 1 and lines[0].startswith("error:") and f"in use by process {winner.pid}" in lines[0], lines
    assert metrics_rounds(run) == [1, 2, 3, 4]
    # A user's backup next to the clients' directories is not the run's to clean.
    backup = os.path.join(run, "clients", "0.bak")
    shutil.copytree(os.path.join(run, "clients", "0"), backup)
    kept = file_hashes(backup)
    log = str(tmp_path / "rerun.log")
    assert finish(start_train(run, log, *RACE_FLAGS[:-2], "--rounds=5", "--key_dim=16", "--keep_rounds=1"), 600) == 0
    assert metrics_rounds(run) == [1, 2, 3, 4, 5]
    assert file_hashes(backup) == kept
    assert run_binary("evaluate", [f"--root_dir={run}", "--public_sizes=1000", "--recovery_steps=5"], log) == 0
    assert any(line.startswith("warning: public size 1000 exceeds") for line in lines_of(log)), lines_of(log)


@pytest.mark.slow
def test_evaluate_reads_a_complete_round_while_training_and_sigint_ends_with_one_line(tmp_path):
    run = str(tmp_path / "run")
    log = str(tmp_path / "train.log")
    flags = ("--dataset=digits", "--num_clients=2", "--rounds=200", "--key_dim=16", "--batch_size=32")
    process = start_train(run, log, *flags)
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.exists(os.path.join(run, "clients", "manifest_00001.json")):
        time.sleep(0.5)
    evaluation_log = str(tmp_path / "evaluate.log")
    rc = run_binary("evaluate", [f"--root_dir={run}", "--public_sizes=50", "--recovery_steps=5"], evaluation_log)
    lines = lines_of(evaluation_log)
    assert not any("Traceback" in line for line in lines), lines
    if rc == 0:  # the round it read was complete when it started
        assert any(line.startswith(f"evaluating {run}: round ") for line in lines), lines
    else:  # the trainer pruned it meanwhile: the error line says so
        errors = [line for line in lines if line.startswith("error:")]
        assert rc == 1 and len(errors) == 1 and f"process {process.pid} is training this run" in errors[0], lines
    assert process.poll() is None, lines_of(log)
    os.kill(process.pid, signal.SIGINT)
    assert finish(process, 600) == 130
    lines = [line for line in lines_of(log) if "error:" in line or "Traceback" in line or "Error" in line]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted (SIGINT)"), lines_of(log)  # on its own line
    done = metrics_rounds(run)[-1]
    assert finish(start_train(run, log, *flags[:2], f"--rounds={done + 1}", *flags[3:]), 600) == 0
    assert lines_of(log)[0].startswith(f"resuming {run} after round")
    assert metrics_rounds(run) == list(range(1, done + 2))


def truncate(path, keep):
    """Keeps the first keep(data) bytes of the file at `path`."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: keep(data)])


@pytest.mark.slow
def test_a_run_without_manifests_resumes_with_a_note_and_its_damaged_metrics_and_client_data_are_rewritten(
    trained_run, tmp_path
):
    run = str(tmp_path / "run")
    shutil.copytree(trained_run, run)
    shutil.rmtree(os.path.join(run, "manifests"))  # as a run saved before runs had manifests
    truncate(os.path.join(run, "metrics.csv"), lambda data: data.rindex(b"\n2,") + 6)  # round 2's row cut short
    truncate(os.path.join(run, "client_data", "client_0.tfrecord"), lambda data: len(data) // 2)
    log = str(tmp_path / "log")
    assert run_binary("train", [f"--root_dir={run}", "--rounds=3", *RUN_FLAGS], log) == 0, lines_of(log)
    lines = lines_of(log)
    notes = [line for line in lines if line.startswith("note:")]
    assert notes == [
        f"note: {run} has no manifest of round 2 (saved before runs had them): its files are not checked this time; "
        "every round from now on gets one"
    ], lines
    assert os.listdir(os.path.join(run, "manifests")) == ["manifest_00003.json"]
    assert (
        f"warning: {run}/metrics.csv was damaged (a row cut short, or rounds out of order): rewritten with the "
        "rows of rounds 1..1, rounds 2..2 rebuilt from tensorboard/ (float32)"
    ) in lines
    assert any(f"client data cache {run}/client_data/client_0.tfrecord is damaged" in line for line in lines)
    assert metrics_rounds(run) == [1, 2, 3]
    assert not any("Traceback" in line or line.startswith("error:") for line in lines), lines


@pytest.mark.slow
def test_a_damaged_round_resumes_from_the_intact_round_its_error_names(trained_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(trained_run, run)
    drop_metrics_copies(run)
    truncate(os.path.join(run, "metrics.csv"), lambda data: data.rindex(b"\n2,") + 6)  # round 2's row cut short
    log = str(tmp_path / "log")
    before = file_hashes(run)
    assert run_binary("train", [f"--root_dir={run}", "--rounds=3", *RUN_FLAGS], log) == 1
    (error,) = [line for line in lines_of(log) if line.startswith("error:")]
    assert error == (
        f"error: {run}/metrics.csv does not match the manifest of round 2 ({run}/manifests/manifest_00002.json): "
        f"truncated: {os.path.getsize(os.path.join(run, 'metrics.csv'))} bytes, "
        f"{os.path.getsize(os.path.join(trained_run, 'metrics.csv'))} when the round was saved; restore it from a "
        f"backup, or resume from round 1 (its files are intact): delete program_state_2 in {run}/server"
    )
    assert file_hashes(run) == before
    shutil.rmtree(os.path.join(run, "server", "program_state_2"))
    assert run_binary("train", [f"--root_dir={run}", "--rounds=3", *RUN_FLAGS], log) == 0, lines_of(log)
    lines = lines_of(log)
    assert lines[0].startswith(f"resuming {run} after round 1: {run}/server lacks program_state_2"), lines
    assert any(line.startswith(f"warning: {run}/metrics.csv was damaged") for line in lines), lines
    assert metrics_rounds(run) == [1, 2, 3]
    with open(os.path.join(trained_run, "metrics.csv")) as f, open(os.path.join(run, "metrics.csv")) as g:
        assert g.read().startswith(f.read().split("\n2,")[0])
    assert sorted(os.listdir(os.path.join(run, "manifests"))) == [f"manifest_0000{r}.json" for r in range(4)]


def glue_rows(data):
    """Round 2's row glued onto round 1's (the newline between them lost), then round 2's row again."""
    end_of_row_1 = data.rindex(b"\n2,")
    return data[:end_of_row_1] + data[end_of_row_1 + 1 :] + data[end_of_row_1:]


METRICS_DAMAGE = {
    "truncated": lambda path: truncate(path, lambda data: data.rindex(b"\n2,") + 6),
    "glued-rows": lambda path: rewrite(path, glue_rows),
    "deleted": os.remove,
    "emptied": lambda path: truncate(path, lambda data: 0),
}


def rewrite(path, change):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(change(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(METRICS_DAMAGE))
def test_a_damaged_metrics_csv_is_rewritten_from_the_manifest_and_resumes_with_rounds_1_to_n(
    damage, trained_run, tmp_path
):
    run = str(tmp_path / "run")
    shutil.copytree(trained_run, run)
    path = os.path.join(run, "metrics.csv")
    METRICS_DAMAGE[damage](path)
    log = str(tmp_path / "log")
    assert run_binary("train", [f"--root_dir={run}", "--rounds=3", *RUN_FLAGS], log) == 0, lines_of(log)
    lines = lines_of(log)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1, lines
    assert warnings[0].startswith(f"warning: {path} did not match the manifest of round 2 (")
    assert warnings[0].endswith(
        f"): rewritten from {run}/manifests/manifest_00002.json, as it was when round 2 was saved"
    )
    assert not any("Traceback" in line or line.startswith("error:") for line in lines), lines
    assert metrics_rounds(run) == [1, 2, 3]
    with open(os.path.join(trained_run, "metrics.csv"), "rb") as f, open(path, "rb") as g:
        assert g.read().startswith(f.read())  # rounds 1 and 2 exactly as trained


@pytest.mark.slow
def test_a_round_whose_manifest_is_missing_trains_again_and_ends_the_same(trained_run, tmp_path):
    """A save interrupted between the server state and the manifest: the round trains again, from the last one
    with a manifest, to the same files."""
    run = str(tmp_path / "run")
    shutil.copytree(trained_run, run)
    os.remove(os.path.join(run, "manifests", "manifest_00002.json"))
    log = str(tmp_path / "log")
    assert run_binary("train", [f"--root_dir={run}", "--rounds=2", *RUN_FLAGS], log) == 0, lines_of(log)
    assert lines_of(log)[0] == (
        f"resuming {run} after round 1: {run}/manifests lacks manifest_00002.json (an interrupted save, or "
        "deleted), so round 2 trains again"
    )
    assert file_hashes(os.path.join(run, "client_data")) == file_hashes(os.path.join(trained_run, "client_data"))
    for cid in ("0", "1"):
        name = os.path.join("clients", cid, "state_00002.npz")
        with np.load(os.path.join(run, name)) as got, np.load(os.path.join(trained_run, name)) as want:
            assert sorted(got.files) == sorted(want.files)
            for array in want.files:
                np.testing.assert_array_equal(got[array], want[array], err_msg=f"{name}: {array}")


@pytest.mark.slow
def test_manifests_and_keys_are_owner_only_and_a_manifest_holds_no_key(trained_run):
    for name in ("manifests/manifest_00002.json", "clients/0/key"):
        assert os.stat(os.path.join(trained_run, name)).st_mode & 0o077 == 0, name
    with open(os.path.join(trained_run, "clients", "0", "key"), "rb") as f:
        key = f.read()
    with open(os.path.join(trained_run, "manifests", "manifest_00002.json"), "rb") as f:
        assert key not in f.read()


@pytest.mark.parametrize("field", ["learning_rate", "alpha", "momentum", "dp_clip", "random_key_penalty", "lr_gamma"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), float("-inf")])
def test_config_refuses_non_finite_numbers(field, value):
    from tfkl.federated.config import Config

    with pytest.raises(ValueError, match=f"^{field} must be a finite number, got {value}$"):
        Config(algorithm="fedavg", client_weighting="uniform", **{field: value})


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only; skipped where mounting is not allowed, e.g. in Bazel's sandbox), unmounted after."""
    path = str(tmp_path / "disk")
    os.makedirs(path)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", path], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}), e.g. without CAP_SYS_ADMIN or in a sandbox")
    yield path
    subprocess.run(["umount", path], check=True)


def manifested_files(run):
    """Path -> SHA-256 of every manifest of the run and of every file they list but metrics.csv (which grows)."""
    listed = {os.path.join("manifests", name) for name in os.listdir(os.path.join(run, "manifests"))}
    for name in list(listed):
        with open(os.path.join(run, name)) as f:
            listed |= set(json.load(f)["files"]) - {"metrics.csv"}
    hashes = file_hashes(run)
    return {path: hashes[path] for path in sorted(listed)}


@pytest.mark.slow
def test_a_full_disk_ends_with_one_line_and_the_same_command_resumes_once_there_is_space(small_disk, tmp_path):
    run, log = os.path.join(small_disk, "run"), str(tmp_path / "log")
    args = [f"--root_dir={run}", "--rounds=10", *RUN_FLAGS, "--keep_rounds=20"]  # every round kept: the disk fills
    assert run_binary("train", args, log) == 1, lines_of(log)
    lines = lines_of(log)
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot save the run in {run}: No space left on device;")
    assert not any("Traceback" in line for line in lines), lines
    saved = manifested_files(run)
    assert 1 <= len(os.listdir(os.path.join(run, "manifests"))) < 11
    subprocess.run(["mount", "-o", "remount,size=64m", small_disk], check=True)
    assert run_binary("train", args, log) == 0, lines_of(log)
    assert lines_of(log)[0].startswith(f"resuming {run} after round "), lines_of(log)
    after = manifested_files(run)
    assert {path: after[path] for path in saved} == saved  # the rounds saved before the disk filled are intact
    assert metrics_rounds(run) == list(range(1, 11))
    assert not [name for name in os.listdir(os.path.join(run, "server")) if "_temp" in name]


@pytest.mark.slow
def test_examples_per_client_beyond_every_client_is_said_not_clamped_silently(tmp_path):
    run, log = str(tmp_path / "run"), str(tmp_path / "log")
    assert (
        run_binary("train", [f"--root_dir={run}", "--rounds=1", *RUN_FLAGS, "--examples_per_client=100000"], log) == 0
    )
    warnings = [line for line in lines_of(log) if line.startswith("warning:")]
    assert warnings == [
        "warning: examples_per_client=100000 exceeds every client's examples (at most 719): each client trains on all "
        "of its examples"
    ], lines_of(log)
