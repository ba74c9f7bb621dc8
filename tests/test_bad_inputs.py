"""Bad inputs to every binary: one `error:` line (the README's promise), a non-zero exit code, no traceback,
and the run directory's files unchanged.

The binaries run as subprocesses, `JOBS` at a time; the cases that need a trained run copy one small run
(digits, 2 clients, 2 rounds, a capture of round 2) trained once per session.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import kill_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = int(os.environ.get("TFKL_TEST_JOBS", "2"))
RUN_FLAGS = ["--dataset=digits", "--num_clients=2", "--key_dim=16", "--batch_size=32", "--keep_rounds=5"]
CAPTURE = "captures/round_00002_client_0.npz"


def run_binary(module, args, log, timeout=300):
    """Runs a binary in its own process group (its TFF worker with it), output to `log`; the exit code."""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", module if "." in module else f"tff_programs.{module}", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return process.wait(timeout)
        finally:
            kill_group(process)


def file_hashes(directory):
    """Relative path -> SHA-256 of every file under `directory`."""
    hashes = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def set_immutable(path, immutable):
    """Makes `path` read-only even for root (chattr +i), or writable again."""
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i" if immutable else "-i", path], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"root cannot make {path} read-only here (chattr: {done.stderr.strip()}), e.g. in a sandbox")
    else:
        os.chmod(path, 0o555 if immutable else 0o755)


# Mutations of a copied run (`run`: its root dir, `tmp`: a scratch dir of the case).


def delete_clients(run, tmp):
    shutil.rmtree(os.path.join(run, "clients"))


def swap_key(run, tmp):
    shutil.copy(os.path.join(run, "clients", "1", "key"), os.path.join(run, "clients", "0", "key"))


def flip_key_byte(run, tmp):
    with open(os.path.join(run, "clients", "0", "key"), "r+b") as f:
        f.seek(30)
        f.write(b"\x00\x01")


def reshape_client_state(run, tmp):
    """A lock weight of another shape, with the manifest's checksum updated to match."""
    path = os.path.join(run, "clients", "0", "state_00002.npz")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["lock/00000"] = np.zeros((3, 3), np.float32)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    manifest = os.path.join(run, "clients", "manifest_00002.json")
    with open(manifest) as f:
        entries = json.load(f)
    with open(path, "rb") as f:
        fields = entries["clients"]["0"].split(" ")  # "round sha256 counts... has_key"
        entries["clients"]["0"] = " ".join([fields[0], hashlib.sha256(f.read()).hexdigest(), *fields[2:]])
    with open(manifest, "w") as f:
        json.dump(entries, f)


def corrupt_client_state(run, tmp):
    with open(os.path.join(run, "clients", "0", "state_00002.npz"), "ab") as f:
        f.write(b"x")


def delete_manifest(run, tmp):
    os.remove(os.path.join(run, "clients", "manifest_00002.json"))


def pre_manifest(setup):
    """`setup` on a run without its manifests (as saved before runs had them): the checks behind the
    manifest's, which such a run relies on."""

    def without_manifests(run, tmp):
        shutil.rmtree(os.path.join(run, "manifests"))
        return setup(run, tmp)

    return without_manifests


def corrupt_config(run, tmp):
    with open(os.path.join(run, "config.json"), "w") as f:
        f.write("{")


def make_file(run, tmp):
    with open(os.path.join(tmp, "file"), "w") as f:
        f.write("not a directory")


def make_foreign_dir(run, tmp):
    os.makedirs(os.path.join(tmp, "foreign"))
    with open(os.path.join(tmp, "foreign", "notes.txt"), "w") as f:
        f.write("someone else's")


def read_only_run(run, tmp):
    set_immutable(run, True)
    return lambda: set_immutable(run, False)


def read_only_parent(run, tmp):
    os.makedirs(os.path.join(tmp, "ro"))
    set_immutable(os.path.join(tmp, "ro"), True)
    return lambda: set_immutable(os.path.join(tmp, "ro"), False)


def _rewrite_capture(run, edit):
    path = os.path.join(run, CAPTURE)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    edit(meta)
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def capture_of_another_model(run, tmp):
    """The meta's architecture names another model (its first conv has 8 filters, the weights 12)."""

    def edit(meta):
        conv = next(layer for layer in meta["architecture"]["config"]["layers"] if layer["class_name"] == "Conv2D")
        conv["config"]["filters"] = 8

    _rewrite_capture(run, edit)


def capture_of_another_input_shape(run, tmp):
    _rewrite_capture(run, lambda meta: meta.update(input_shape=[28, 28, 1]))


def truncate_capture(run, tmp):
    path = os.path.join(run, CAPTURE)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def capture_of_an_offline_data_set(run, tmp):
    _rewrite_capture(run, lambda meta: meta["ground_truth"].update(dataset="mnist"))


def capture_arrays(change):
    """The capture's arrays changed by `change(name, array)` (its meta kept)."""

    def setup(run, tmp):
        path = os.path.join(run, CAPTURE)
        with np.load(path) as f:
            arrays = {k: f[k] if k == "meta" else change(k, f[k]) for k in f.files}
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    return setup


def empty_capture(run, tmp):
    open(os.path.join(run, CAPTURE), "w").close()


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    binary: str
    args: tuple  # {run}: the copied run's root dir, {tmp}: the case's scratch dir
    expect: str  # a part of the error line
    setup: object = None  # a mutation above; returns an undo callable or None
    needs_run: bool = False  # set from args: a copy of the trained run

    def __repr__(self):
        return self.id


NEW = "--root_dir={tmp}/new"
RESUME = ("--root_dir={run}", "--rounds=3", *RUN_FLAGS)  # the copied trained run, one round further
ATTACK_CAPTURE = ("--capture={run}/" + CAPTURE, "--threat=fixed-key", "--noscore", "--out_dir={tmp}/out")
CASES = [
    # train: flags
    Case("train-no-root-dir", "train", (), "--root_dir must have a value"),
    Case("train-empty-root-dir", "train", ("--root_dir=",), "--root_dir must not be empty"),
    Case("train-unknown-flag", "train", (NEW, "--nosuchflag=1"), "Unknown command line flag 'nosuchflag'"),
    Case("train-positional-argument", "train", (NEW, "extra"), "unexpected arguments: extra"),
    Case("train-rounds-zero", "train", (NEW, "--rounds=0"), "--rounds"),
    Case("train-rounds-not-a-number", "train", (NEW, "--rounds=abc"), "--rounds"),
    Case("train-algorithm", "train", (NEW, "--algorithm=fedsgd"), "--algorithm"),
    Case("train-model", "train", (NEW, "--model=lenet5"), "--model"),
    Case("train-dataset", "train", (NEW, "--dataset=svhn"), "--dataset"),
    Case("train-key-dim-zero", "train", (NEW, "--key_dim=0"), "--key_dim"),
    Case("train-key-distribution", "train", (NEW, "--key_distribution=laplace"), "--key_distribution"),
    Case("train-lock-affine", "train", (NEW, "--lock_affine=pixel"), "--lock_affine"),
    Case("train-lock-where", "train", (NEW, "--lock_where=first-three"), "--lock_where"),
    Case("train-keep-rounds-zero", "train", (NEW, "--keep_rounds=0"), "--keep_rounds"),
    Case("train-lr-milestones", "train", (NEW, "--lr_milestones=a,b"), "--lr_milestones must be a list"),
    Case("train-capture-rounds", "train", (NEW, "--capture_rounds=last"), "--capture_rounds must be 'all'"),
    Case("train-inject-nan", "train", (NEW, "--inject_nan=x"), "ROUND:CLIENT"),
    Case("train-inject-failure", "train", (NEW, "--inject_failure=1"), "ROUND:CLIENT"),
    Case("train-workers-malformed", "train", (NEW, "--workers=127.0.0.1"), "--workers: '127.0.0.1' is not host:port"),
    Case("train-worker-failure-timeout", "train", (NEW, "--worker_failure_timeout=0"), "must be > 0 seconds"),
    Case("train-on-worker-failure", "train", (NEW, "--on_worker_failure=wait"), "--on_worker_failure"),
    # train: the configuration's rules
    Case("train-num-clients-zero", "train", (NEW, "--num_clients=0"), "num_clients must be at least 1"),
    Case("train-batch-size-zero", "train", (NEW, "--batch_size=0"), "batch_size must be at least 1"),
    Case("train-negative-learning-rate", "train", (NEW, "--learning_rate=-1"), "learning_rate must be positive"),
    Case("train-negative-momentum", "train", (NEW, "--momentum=-0.5"), "momentum must not be negative"),
    Case("train-clients-per-round", "train", (NEW, "--num_clients=3", "--clients_per_round=5"), "cannot exceed"),
    Case("train-nesterov-without-momentum", "train", (NEW, "--momentum=0"), "nesterov needs momentum"),
    Case("train-dp-clip-weighting", "train", (NEW, "--dp_clip=1.0"), "client_weighting=uniform"),
    Case("train-prune-fraction", "train", (NEW, "--prune_fraction=1.5"), "prune_fraction must be in [0, 1)"),
    Case(
        "train-negative-random-key-penalty",
        "train",
        (NEW, "--random_key_penalty=-1"),
        "random_key_penalty must not be negative",
    ),
    Case(
        "train-random-key-penalty-without-key",
        "train",
        (NEW, "--algorithm=fedavg-norm", "--random_key_penalty=1"),
        "random_key_penalty needs algorithm=fedkl",
    ),
    Case("train-negative-lock-noise", "train", (NEW, "--lock_noise=-0.5"), "lock_noise must not be negative"),
    Case(
        "train-lock-noise-without-lock",
        "train",
        (NEW, "--algorithm=fedavg-norm", "--lock_noise=0.5"),
        "lock_noise needs algorithm=fedkl",
    ),
    Case("train-more-clients-than-examples", "train", (NEW, "--num_clients=5000"), "cannot split the data"),
    # train: data and root dir
    Case("train-mnist-offline", "train", (NEW, "--dataset=mnist"), "on a connected machine download"),
    Case("train-cifar10-offline", "train", (NEW, "--dataset=cifar10"), "on a connected machine download"),
    Case("train-root-dir-is-a-file", "train", ("--root_dir={tmp}/file", *RUN_FLAGS), "is a file", make_file),
    Case("train-root-dir-not-empty", "train", ("--root_dir={tmp}/foreign",), "is not empty", make_foreign_dir),
    Case("train-read-only-new-root-dir", "train", ("--root_dir={tmp}/ro/new",), "cannot create", read_only_parent),
    # train: a trained run, damaged
    Case("train-read-only-run", "train", RESUME, "cannot write", read_only_run),
    Case(
        "train-clients-deleted",
        "train",
        RESUME,
        "holds no client states, but the server has trained to round 2",
        delete_clients,
    ),
    Case(
        "train-manifest-deleted",
        "train",
        RESUME,
        "the client states of round 2",
        delete_manifest,
    ),
    Case(
        "train-key-swapped",
        "train",
        RESUME,
        "belongs to someone else",
        pre_manifest(swap_key),
    ),
    Case("train-key-corrupt", "train", RESUME, "corrupt", pre_manifest(flip_key_byte)),
    Case(
        "train-client-state-shape",
        "train",
        RESUME,
        "lock[0] is float32[3, 3], the model needs float32[16, 12]",
        pre_manifest(reshape_client_state),
    ),
    Case(
        "train-client-state-corrupt",
        "train",
        RESUME,
        "checksum mismatch",
        pre_manifest(corrupt_client_state),
    ),
    Case("train-another-run", "train", (*RESUME, "--model=resnet20"), "another run"),
    Case("train-config-unreadable", "train", ("--root_dir={run}", *RUN_FLAGS), "unreadable", corrupt_config),
    # evaluate
    Case("evaluate-no-root-dir", "evaluate", (), "--root_dir must have a value"),
    Case("evaluate-missing-root-dir", "evaluate", ("--root_dir={tmp}/none",), "does not exist"),
    Case("evaluate-public-sizes", "evaluate", ("--root_dir={tmp}", "--public_sizes=0"), "positive integers"),
    Case("evaluate-max-clients", "evaluate", ("--root_dir={tmp}", "--max_clients=0"), "--max_clients"),
    Case("evaluate-positional-argument", "evaluate", ("--root_dir={tmp}", "runs/x"), "unexpected arguments: runs/x"),
    Case("evaluate-no-such-round", "evaluate", ("--root_dir={run}", "--round=7"), "round 7"),
    Case("evaluate-key-swapped", "evaluate", ("--root_dir={run}",), "belongs to someone else", swap_key),
    Case("evaluate-clients-deleted", "evaluate", ("--root_dir={run}",), "no complete round", delete_clients),
    # attack
    Case("attack-attack", "attack", ("--attack=fgsm",), "--attack"),
    Case("attack-threat", "attack", ("--threat=foo",), "--threat takes a comma-separated list"),
    Case("attack-num-images-zero", "attack", ("--num_images=0",), "--num_images"),
    Case("attack-lbfgs-learning-rate", "attack", ("--attack=idlg", "--learning_rate=0.1"), "--learning_rate"),
    Case(
        "attack-lbfgs-alternating",
        "attack",
        ("--attack=dlg", "--adaptive_strategy=relearn-alternating"),
        "--adaptive_strategy=relearn-alternating applies to ig and grnn",
    ),
    Case("attack-positional-argument", "attack", ("idlg",), "unexpected arguments: idlg"),
    Case("attack-batch-not-dividing", "attack", ("--num_images=5", "--batch_size=2"), "a multiple of --batch_size"),
    Case("attack-offset", "attack", ("--dataset=digits", "--offset=5000"), "exceeds the 1437 training images"),
    Case("attack-mnist-offline", "attack", ("--dataset=mnist",), "on a connected machine download"),
    Case("attack-missing-capture", "attack", ("--capture={tmp}/none.npz",), "does not exist"),
    Case("attack-empty-capture", "attack", ATTACK_CAPTURE, "the file is empty", empty_capture),
    Case("attack-truncated-capture", "attack", ATTACK_CAPTURE, "BadZipFile", truncate_capture),
    Case("attack-capture-another-model", "attack", ATTACK_CAPTURE, "architecture", capture_of_another_model),
    Case("attack-capture-input-shape", "attack", ATTACK_CAPTURE, "input_shape", capture_of_another_input_shape),
    Case(
        "attack-capture-float64",
        "attack",
        ATTACK_CAPTURE,
        "array global/00000 is float64, a capture's arrays are float32",
        capture_arrays(lambda name, array: array.astype(np.float64)),
    ),
    Case(
        "attack-capture-nan-update",
        "attack",
        ATTACK_CAPTURE,
        "array update/00000 holds NaN or infinite values",
        capture_arrays(lambda name, array: np.full_like(array, np.nan) if name == "update/00000" else array),
    ),
    Case(
        "attack-capture-scored-on-an-offline-data-set",
        "attack",
        ("--capture={run}/" + CAPTURE, "--threat=fixed-key", "--iterations=1", "--out_dir={tmp}/out"),
        "cannot score the attack: mnist needs",
        capture_of_an_offline_data_set,
    ),
    Case(
        "attack-client-learning-rate-inf",
        "attack",
        ("--client_learning_rate=inf",),
        "--client_learning_rate must be positive and finite",
    ),
    Case(
        "attack-capture-threat",
        "attack",
        ("--capture={run}/" + CAPTURE, "--threat=none", "--noscore", "--out_dir={tmp}/out"),
        "applies to a locked capture",
    ),
    # train_central
    Case("train-central-epochs-zero", "train_central", ("--epochs=0",), "--epochs"),
    Case("train-central-learning-rate", "train_central", ("--learning_rate=0",), "--learning_rate must be positive"),
    Case("train-central-positional-argument", "train_central", ("lenet",), "unexpected arguments: lenet"),
    Case("train-central-cifar10-offline", "train_central", ("--dataset=cifar10",), "on a connected machine download"),
    # the realistic-regime benchmark
    Case(
        "regimes-unknown-regime",
        "experiments.studies.regimes",
        ("--regimes=G8,G9",),
        "--regimes takes a comma-separated",
    ),
    Case(
        "regimes-unknown-threat",
        "experiments.studies.regimes",
        ("--threats=none,foo",),
        "--threats takes a comma-separated",
    ),
    Case(
        "regimes-seeds", "experiments.studies.regimes", ("--seeds=0,a",), "--seeds takes comma-separated non-negative"
    ),
    Case("regimes-parallel-cells", "experiments.studies.regimes", ("--parallel_cells=0",), "--parallel_cells"),
    Case(
        "regimes-results-name",
        "experiments.studies.regimes",
        ("--results_name=../x",),
        "--results_name takes [a-z0-9_]+",
    ),
    Case(
        "regimes-tables-from-missing-records",
        "experiments.studies.regimes",
        ("--tabulate_only", "--records_dir={tmp}/records", "--out_dir={tmp}/work"),
        "lacks what",
    ),
    Case(
        "adaptive-attacker-tables-from-missing-cache",
        "experiments.studies.adaptive_attacker",
        ("--aa_tabulate_only", "--aa_cache={tmp}/cache"),
        "lacks what",
    ),
    Case(
        "candidates-tables-from-missing-runs",
        "experiments.studies.candidates",
        ("--cand_tabulate_only", "--cand_dir={tmp}/runs"),
        "lacks what",
    ),
    # the key table benchmark
    Case(
        "key-table-configs",
        "experiments.studies.key_table",
        ("--key_table_configs=fedkl,foo",),
        "--key_table_configs takes",
    ),
    Case("key-table-seeds", "experiments.studies.key_table", ("--key_table_seeds=0,-1",), "--key_table_seeds takes"),
    Case("candidates-names", "experiments.studies.candidates", ("--cand_names=paper,best",), "--cand_names: from"),
    Case("candidates-parts", "experiments.studies.candidates", ("--cand_parts=lenet,cifar",), "--cand_parts: from"),
    # demo
    Case("demo-rounds-zero", "demo", ("--rounds=0",), "--rounds"),
    Case("demo-positional-argument", "demo", ("now",), "unexpected arguments: now"),
    # worker
    Case("worker-no-port", "worker", (), "--port"),
    Case("worker-port-zero", "worker", ("--port=0",), "--port must be in 1..65535"),
    Case("worker-port-too-large", "worker", ("--port=70000",), "--port must be in 1..65535"),
    Case("worker-calls", "worker", ("--port=18599", "--max_concurrent_computation_calls=0"), "must be -1 or > 0"),
    Case("worker-positional-argument", "worker", ("--port=18599", "serve"), "unexpected arguments: serve"),
]
# The tables-from-a-missing-cache cases need the stored results they would drop (Bazel's runfiles have none).
STORED_RESULTS = {
    "regimes-tables-from-missing-records": "regimes",
    "adaptive-attacker-tables-from-missing-cache": "adaptive_attacker",
    "candidates-tables-from-missing-runs": "candidates",
}
CASES = [
    c
    for c in CASES
    if c.id not in STORED_RESULTS or os.path.exists(os.path.join(ROOT, "results", f"{STORED_RESULTS[c.id]}.json"))
]
CASES = [dataclasses.replace(c, needs_run=any("{run}" in a for a in c.args)) for c in CASES]
assert len({c.id for c in CASES}) == len(CASES)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One small trained FedKL run (digits, 2 clients, 2 rounds, round 2 captured), for copies only."""
    root = str(tmp_path_factory.mktemp("trained") / "run")
    rc = run_binary("train", [f"--root_dir={root}", "--rounds=2", "--capture_rounds=2", *RUN_FLAGS], root + ".log")
    with open(root + ".log") as f:
        assert rc == 0, f.read()[-2000:]
    return root


def run_case(case, trained, tmp):
    """Runs `case` on a copy of the trained run; (exit code, output lines, run's files before, after)."""
    run = os.path.join(tmp, "run")
    if case.needs_run:
        shutil.copytree(trained, run)
    undo = case.setup(run, tmp) if case.setup else None
    try:
        before = file_hashes(run) if case.needs_run else None
        args = [a.format(run=run, tmp=tmp) for a in case.args]
        rc = run_binary(case.binary, args, os.path.join(tmp, "log"))
        after = file_hashes(run) if case.needs_run else None
    finally:
        if undo:
            undo()
    with open(os.path.join(tmp, "log")) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    return rc, lines, before, after, os.path.exists(os.path.join(tmp, "new"))


@pytest.fixture(scope="session")
def outcomes(request, tmp_path_factory):
    """The outcome of every selected case, run `JOBS` at a time (the trained run first, if any needs it)."""
    selected = [item.callspec.params["case"] for item in request.session.items if item.originalname == "test_bad_input"]
    trained = request.getfixturevalue("trained_run") if any(case.needs_run for case in selected) else None
    with concurrent.futures.ThreadPoolExecutor(JOBS) as pool:
        futures = {
            case.id: pool.submit(run_case, case, trained, str(tmp_path_factory.mktemp(case.id))) for case in selected
        }
        return {case_id: future for case_id, future in futures.items()}


# Cases past flag parsing load TensorFlow, the data or a run (~10-20 s each on 2 cores): marked slow, so the
# default suite keeps the flag cases (the whole file takes about 8 minutes alone, JOBS=2).
PAST_FLAG_PARSING = (
    "train-num-clients-zero",
    "train-batch-size-zero",
    "train-negative-learning-rate",
    "train-negative-momentum",
    "train-clients-per-round",
    "train-nesterov-without-momentum",
    "train-dp-clip-weighting",
    "train-prune-fraction",
    "train-negative-random-key-penalty",
    "train-random-key-penalty-without-key",
    "train-more-clients-than-examples",
    "train-mnist-offline",
    "train-cifar10-offline",
    "train-root-dir-is-a-file",
    "train-root-dir-not-empty",
    "train-read-only-new-root-dir",
    "evaluate-missing-root-dir",
    "attack-lbfgs-learning-rate",
    "attack-lbfgs-alternating",
    "attack-offset",
    "attack-mnist-offline",
    "attack-missing-capture",
    "train-central-cifar10-offline",
)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c.needs_run or c.id in PAST_FLAG_PARSING else c for c in CASES],
    ids=[c.id for c in CASES],
)
def test_bad_input(case, outcomes):
    rc, lines, before, after, created_root_dir = outcomes[case.id].result()
    errors = [line for line in lines if line.startswith("error:")]
    assert rc != 0, lines
    assert len(errors) == 1 and case.expect in errors[0], lines
    assert not any("Traceback" in line or "FATAL" in line or line.startswith("USAGE") for line in lines), lines
    assert before == after and not created_root_dir


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40


def copy_run(trained_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(trained_run, run)
    return run


def output_lines(log):
    with open(log) as f:
        return [line for line in f.read().splitlines() if line.strip()]


def test_rounds_already_trained_is_nothing_to_do(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    before = file_hashes(run)
    log = str(tmp_path / "log")
    assert run_binary("train", [f"--root_dir={run}", "--rounds=1", *RUN_FLAGS], log) == 0
    assert output_lines(log) == [f"nothing to do: {run} has trained 2 rounds already (--rounds=1)"]
    assert file_hashes(run) == before


def test_deleted_server_state_says_from_which_round_it_resumes(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    shutil.rmtree(os.path.join(run, "server", "program_state_2"))
    log = str(tmp_path / "log")
    assert run_binary("train", [f"--root_dir={run}", "--rounds=2", *RUN_FLAGS], log) == 0
    lines = output_lines(log)
    assert lines[0] == (
        f"resuming {run} after round 1: {run}/server lacks program_state_2 (an interrupted save, or deleted), "
        "so round 2 trains again"
    )
    assert lines[-1].endswith(f"done: {run} at round 2")


def _library_cases():
    import tfkl
    from tfkl import models

    def secured():
        return models.build("lenet", (32, 32, 1), 10, lock=True, key_dim=16)

    def corrupt_export(directory):
        tfkl.export_shared(secured(), directory)
        with open(os.path.join(directory, "shared.npz"), "wb") as f:
            f.write(b"not a zip file")
        return tfkl.load_shared(directory)

    def export_to_file(directory):
        with open(directory, "w") as f:
            f.write("a file")
        tfkl.export_shared(secured(), directory)

    return {
        "secure-twice": (lambda d: tfkl.secure(secured()), ValueError, "already has KeyLock"),
        "load-shared-corrupt": (corrupt_export, ValueError, "not a readable export_shared directory"),
        "load-shared-missing": (lambda d: tfkl.load_shared(d), ValueError, "not a readable export_shared directory"),
        "export-shared-to-a-file": (export_to_file, ValueError, "is a file"),
        "generate-key-string": (lambda d: tfkl.generate_key("abc"), tfkl.KeyFormatError, "must be an integer"),
        "generate-key-zero": (lambda d: tfkl.generate_key(0), tfkl.KeyFormatError, "must be positive"),
        "build-no-classes": (lambda d: models.build("lenet", (32, 32, 1), 0), ValueError, "num_classes"),
        "build-bad-input-shape": (lambda d: models.build("lenet", (32, 32)), ValueError, "input_shape"),
        "set-key-wrong-length": (lambda d: tfkl.set_key(secured(), np.ones(8)), tfkl.KeyFormatError, "length 8"),
    }


LIBRARY_CASES = (
    "secure-twice",
    "load-shared-corrupt",
    "load-shared-missing",
    "export-shared-to-a-file",
    "generate-key-string",
    "generate-key-zero",
    "build-no-classes",
    "build-bad-input-shape",
    "set-key-wrong-length",
)


@pytest.mark.parametrize("name", LIBRARY_CASES)
def test_library_misuse_is_one_clear_exception(name, tmp_path):
    call, error, message = _library_cases()[name]
    with pytest.raises(error, match=message):
        call(str(tmp_path / "target"))


def test_key_file_names_its_owner(tmp_path):
    import tfkl

    path = str(tmp_path / "key")
    key = tfkl.generate_key(8)
    tfkl.save_key(path, key, owner="run abc client 0")
    np.testing.assert_array_equal(tfkl.load_key(path, 8, owner="run abc client 0"), key)
    with pytest.raises(tfkl.KeyFormatError, match="belongs to someone else"):
        tfkl.load_key(path, 8, owner="run abc client 1")
