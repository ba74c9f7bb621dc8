"""The cases of experiments.perf.bad_inputs_sweep: bad flags and damaged copies of a small trained run, by class.

A case's args name {run} (its copy of the base run; a new run's root dir when `copy` is False) and {tmp} (its
scratch dir). `expect`: "refuse" (one `error:` line, exit 1, nothing changed), "warn" (exit 0 with a warning
line, nothing lost), "accept" (exit 0, nothing lost) or several of them joined by "|".
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import threading
import time

import numpy as np

RUN = ("--dataset=digits", "--num_clients=3", "--model=lenet")
BASE_FLAGS = (*RUN, "--rounds=2", "--capture_rounds=2")
CAPTURE = "captures/round_00002_client_0.npz"
NEW = ("--root_dir={tmp}/new", *RUN, "--rounds=2")
RESUME = ("--root_dir={run}", *RUN, "--rounds=3")
EVALUATE = ("--root_dir={run}", "--public_sizes=50", "--recovery_steps=1", "--max_clients=1")
ATTACK = ("--attack=idlg", "--dataset=digits", "--num_images=1", "--iterations=1", "--out_dir={tmp}/out")
ATTACK_CAPTURE = (
    "--capture={run}/" + CAPTURE,
    "--threat=fixed-key",
    "--noscore",
    "--iterations=1",
    "--out_dir={tmp}/out",
)
DEMO = ("--rounds=1", "--noattack", "--nobaseline")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    cls: str
    binary: str
    args: tuple
    setup: object = None  # (run, tmp) -> an undo callable or None
    expect: str = "refuse"
    rounds: int = 0  # metrics rounds 1..rounds after an exit 0 (0: not checked)
    may_change: tuple = ()  # paths under the run a successful case may rewrite
    kind: str = "plain"  # plain, writers (two trains), reader (train, then evaluate), sigint
    copy: bool = None  # a copy of the base run at {run} (default: whether the args name {run})

    @property
    def needs_run(self):
        return ("{run}" in " ".join(self.args)) if self.copy is None else self.copy


def undo_immutable(directory):
    """Clears chattr +i under `directory` (a case's read-only files), so that it can be deleted."""
    subprocess.run(["chattr", "-R", "-i", directory], capture_output=True)


def immutable(name):
    def setup(run, tmp):
        path = os.path.join(run, name) if name else run
        done = subprocess.run(["chattr", "+i", path], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"chattr +i {path}: {done.stderr.strip()} (run the sweep as root on a local disk)")
        return lambda: subprocess.run(["chattr", "-i", path], capture_output=True)

    return setup


def replace_by_file(name):
    def setup(run, tmp):
        path = os.path.join(run, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):  # an older run may lack it: the file then stands where a newer one writes
            os.remove(path)
        with open(path, "w") as f:
            f.write("not what the run wrote")

    return setup


def replace_by_dir(name):
    def setup(run, tmp):
        path = os.path.join(run, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.makedirs(os.path.join(path, "inside"))

    return setup


def write_file(name, data, under_run=True):
    """Writes `data` to `name` under the run (or under the case's scratch dir)."""

    def setup(run, tmp):
        path = os.path.join(run if under_run else tmp, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    return setup


def read_only_dir(name):
    """A directory `name` in the scratch dir that nothing may write."""

    def setup(run, tmp):
        os.makedirs(os.path.join(tmp, name))
        return immutable(os.path.join(tmp, name))(run, tmp)

    return setup


def edit_file(name, change):
    def setup(run, tmp):
        path = os.path.join(run, name)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(change(data))

    return setup


def delete(name):
    def setup(run, tmp):
        path = os.path.join(run, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    return setup


def edit_config(change):
    def setup(run, tmp):
        path = os.path.join(run, "config.json")
        with open(path) as f:
            config = json.load(f)
        with open(path, "w") as f:
            json.dump(change(config), f, indent=1)

    return setup


def steps(*setups):
    def setup(run, tmp):
        for step in setups:
            step(run, tmp)

    return setup


def copy(source, target):
    def setup(run, tmp):
        (shutil.copytree if os.path.isdir(os.path.join(run, source)) else shutil.copy)(
            os.path.join(run, source), os.path.join(run, target)
        )

    return setup


def edit_capture(change):
    """The capture's arrays (and its meta, as a dict) changed by `change(arrays, meta)`, saved again."""

    def setup(run, tmp):
        path = os.path.join(run, CAPTURE)
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays["meta"]))
        change(arrays, meta)
        arrays["meta"] = np.array(json.dumps(meta))
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    return setup


def _float64(arrays, meta):
    for name in arrays:
        if name != "meta":
            arrays[name] = arrays[name].astype(np.float64)


def _nan_update(arrays, meta):
    name = sorted(n for n in arrays if n.startswith("update/"))[0]
    arrays[name] = np.full_like(arrays[name], np.nan)


def _drop_update(arrays, meta):
    del arrays[sorted(n for n in arrays if n.startswith("update/"))[-1]]


def _offline_ground_truth(arrays, meta):
    meta.setdefault("ground_truth", {})["dataset"] = "mnist"


def _glue_rows(data):
    end_of_row_1 = data.rindex(b"\n2,")
    return data[:end_of_row_1] + data[end_of_row_1 + 1 :] + data[end_of_row_1:]


def _row_twice(data):
    lines = data.split(b"\n")
    return b"\n".join([lines[0], lines[1], lines[1], *lines[2:]])


def _rows_swapped(data):
    lines = data.split(b"\n")
    return b"\n".join([lines[0], lines[2], lines[1], *lines[3:]])


def _flag_cases(binary, cls, base, bad_flags, extra=()):
    """A refusal case per bad flag of `binary`, each added to the `base` args."""
    return [
        Case(f"{binary}-flag{flag.split('=')[0]}={flag.partition('=')[2]}", cls, binary, (*base, flag))
        for flag in bad_flags
    ] + list(extra)


def train_flag_cases():
    bad = [
        *(f"--learning_rate={v}" for v in ("inf", "nan", "-inf", "0", "-1")),
        "--server_learning_rate=inf",
        "--server_learning_rate=0",
        *(f"--clients_per_round={v}" for v in ("0", "-1", "4")),
        "--num_clients=0",
        "--num_clients=-2",
        "--num_clients=100000",
        *(f"--lr_milestones={v}" for v in ("-5", "0", "x")),
        "--lr_gamma=0",
        "--lr_gamma=nan",
        *(f"--capture_rounds={v}" for v in ("-1", "0", "x")),
        *(f"--inject_nan={v}" for v in ("1:9", "0:0", "1:-1", "x")),
        "--inject_failure=1:9",
        "--inject_failure=0:1",
        "--rounds=0",
        "--rounds=-1",
        "--local_epochs=0",
        "--batch_size=0",
        "--batch_size=-1",
        "--examples_per_client=0",
        "--alpha=0",
        "--alpha=inf",
        "--momentum=-1",
        "--momentum=nan",
        "--weight_decay=-1",
        "--weight_decay=inf",
        "--dp_clip=0",
        "--dp_noise_multiplier=-1",
        "--prune_fraction=-0.5",
        "--prune_fraction=1",
        "--random_key_penalty=inf",
        "--key_dim=0",
        "--key_dim=-1",
        "--keep_rounds=0",
        "--keep_rounds=-1",
        "--nosuchflag=1",
    ]
    extra = [
        Case("train-flag-positional", "nonsense flags", "train", (*NEW, "extra")),
        Case(
            "train-flag-examples-beyond-data",
            "nonsense flags",
            "train",
            (*NEW, "--examples_per_client=100000"),
            expect="refuse|warn",
        ),
        Case("train-flag-root-dir-empty", "nonsense flags", "train", ("--root_dir=", *RUN, "--rounds=2")),
    ]
    return _flag_cases("train", "nonsense flags", NEW, bad, extra)


def other_flag_cases():
    evaluate = [
        "--public_sizes=0",
        "--public_sizes=-1",
        "--public_sizes=x",
        "--max_clients=0",
        "--max_clients=-1",
        "--recovery_steps=0",
        "--round=9",
        "--round=-1",
        "--nosuchflag=1",
    ]
    attack = [
        "--num_images=0",
        "--num_images=-1",
        "--iterations=0",
        "--restarts=0",
        "--offset=-1",
        "--offset=99999",
        "--batch_size=0",
        "--client_learning_rate=inf",
        "--threat=foo",
        "--nosuchflag=1",
    ]
    demo = ["--rounds=0", "--rounds=-1", "--attack_iterations=0", "--nosuchflag=1"]
    extra = [
        Case(
            "evaluate-public-sizes-beyond-data",
            "nonsense flags",
            "evaluate",
            (*EVALUATE, "--public_sizes=100000"),
            expect="refuse|warn",
        ),
        Case("evaluate-root-dir-missing", "nonsense flags", "evaluate", ("--root_dir={tmp}/none",)),
        Case(
            "evaluate-root-dir-file",
            "nonsense flags",
            "evaluate",
            ("--root_dir={tmp}/file",),
            write_file("file", b"x", under_run=False),
        ),
        Case(
            "evaluate-root-dir-not-a-run",
            "nonsense flags",
            "evaluate",
            ("--root_dir={tmp}/foreign",),
            write_file("foreign/notes.txt", b"mine", under_run=False),
        ),
        Case("evaluate-root-dir-empty", "nonsense flags", "evaluate", ("--root_dir=",)),
        Case(
            "attack-learning-rate-nan", "nonsense flags", "attack", (*ATTACK[1:], "--attack=ig", "--learning_rate=nan")
        ),
        Case("demo-positional", "nonsense flags", "demo", ("--root_dir={tmp}/demo", *DEMO, "extra")),
    ]
    return (
        _flag_cases("evaluate", "nonsense flags", EVALUATE, evaluate)
        + _flag_cases("attack", "nonsense flags", ATTACK, attack)
        + _flag_cases("demo", "nonsense flags", ("--root_dir={tmp}/demo", *DEMO), demo)
        + extra
    )


def out_path_cases():
    cls = "bad out paths"
    file = write_file("file", b"x", under_run=False)
    return [
        Case("train-root-dir-proc", cls, "train", ("--root_dir=/proc/tfkl-run", *RUN, "--rounds=2")),
        Case("train-root-dir-a-file", cls, "train", ("--root_dir={tmp}/file", *RUN, "--rounds=2"), file),
        Case("train-root-dir-under-a-file", cls, "train", ("--root_dir={tmp}/file/run", *RUN, "--rounds=2"), file),
        Case(
            "train-root-dir-read-only",
            cls,
            "train",
            ("--root_dir={tmp}/ro/run", *RUN, "--rounds=2"),
            read_only_dir("ro"),
        ),
        Case("evaluate-out-a-directory", cls, "evaluate", (*EVALUATE, "--out={tmp}")),
        Case("evaluate-out-under-a-file", cls, "evaluate", (*EVALUATE, "--out={tmp}/file/e.json"), file),
        Case("evaluate-out-proc", cls, "evaluate", (*EVALUATE, "--out=/proc/e.json")),
        Case("evaluate-out-read-only", cls, "evaluate", (*EVALUATE, "--out={tmp}/ro/e.json"), read_only_dir("ro")),
        Case("attack-out-dir-a-file", cls, "attack", (*ATTACK, "--out_dir={tmp}/file"), file),
        Case("attack-out-dir-under-a-file", cls, "attack", (*ATTACK, "--out_dir={tmp}/file/out"), file),
        Case("attack-out-dir-proc", cls, "attack", (*ATTACK, "--out_dir=/proc/out")),
        Case("attack-out-dir-read-only", cls, "attack", (*ATTACK, "--out_dir={tmp}/ro/out"), read_only_dir("ro")),
        Case("demo-root-dir-a-file", cls, "demo", ("--root_dir={tmp}/file", *DEMO), file),
        Case("demo-root-dir-proc", cls, "demo", ("--root_dir=/proc/demo", *DEMO)),
        Case("demo-root-dir-read-only", cls, "demo", ("--root_dir={tmp}/ro/demo", *DEMO), read_only_dir("ro")),
    ]


def _without_run_id(config):
    return {k: v for k, v in config.items() if k != "run_id"}


def key_cases():
    cls = "key binding"
    key0, key1 = "clients/0/key", "clients/1/key"
    return [
        Case("key-unbound-and-swapped", cls, "train", RESUME, steps(edit_config(_without_run_id), copy(key1, key0))),
        Case("key-run-id-removed", cls, "train", RESUME, edit_config(_without_run_id)),
        Case("key-swapped", cls, "train", RESUME, copy(key1, key0)),
        Case("key-run-id-changed", cls, "train", RESUME, edit_config(lambda c: {**c, "run_id": "0" * 16})),
        Case("key-truncated", cls, "train", RESUME, edit_file(key0, lambda d: d[: len(d) // 2])),
        Case("key-emptied", cls, "train", RESUME, edit_file(key0, lambda d: b"")),
        Case("key-deleted", cls, "train", RESUME, delete(key0)),
        Case("key-a-directory", cls, "train", RESUME, replace_by_dir(key0)),
        Case(
            "key-clients-swapped",
            cls,
            "train",
            RESUME,
            steps(
                copy("clients/0", "clients/x"),
                delete("clients/0"),
                copy("clients/1", "clients/0"),
                delete("clients/1"),
                copy("clients/x", "clients/1"),
                delete("clients/x"),
            ),
        ),
        Case("key-swapped-evaluate", cls, "evaluate", EVALUATE, copy(key1, key0)),
        Case(
            "key-unbound-and-swapped-evaluate",
            cls,
            "evaluate",
            EVALUATE,
            steps(edit_config(_without_run_id), copy(key1, key0)),
        ),
    ]


def metrics_cases():
    """A damaged metrics.csv: rewritten (a warning line), rounds 1..3 after the resumed round."""
    cls = "silent loss on resume"
    metrics = "metrics.csv"
    repaired = dict(expect="warn", rounds=3)
    return [
        Case(
            "loss-metrics-truncated",
            cls,
            "train",
            RESUME,
            edit_file(metrics, lambda d: d[: d.rindex(b"\n2,") + 6]),
            **repaired,
        ),
        Case("loss-metrics-glued-rows", cls, "train", RESUME, edit_file(metrics, _glue_rows), **repaired),
        Case("loss-metrics-deleted", cls, "train", RESUME, delete(metrics), **repaired),
        Case("loss-metrics-emptied", cls, "train", RESUME, edit_file(metrics, lambda d: b""), **repaired),
        Case("loss-metrics-row-twice", cls, "train", RESUME, edit_file(metrics, _row_twice), **repaired),
        Case("loss-metrics-rows-swapped", cls, "train", RESUME, edit_file(metrics, _rows_swapped), **repaired),
        Case(
            "loss-metrics-header-lost",
            cls,
            "train",
            RESUME,
            edit_file(metrics, lambda d: d[d.index(b"\n") + 1 :]),
            **repaired,
        ),
    ]


def client_cache_cases():
    """A damaged or deleted client data cache: refused, or written again from the data set."""
    cls = "silent loss on resume"
    return [
        Case(
            "loss-client-cache-truncated",
            cls,
            "train",
            RESUME,
            edit_file("client_data/client_0.tfrecord", lambda d: d[: len(d) // 2]),
            expect="refuse|warn",
            rounds=3,
            may_change=("client_data/",),
        ),
        Case(
            "loss-client-cache-deleted",
            cls,
            "train",
            RESUME,
            delete("client_data/client_0.tfrecord"),
            expect="accept|warn",
            rounds=3,
            may_change=("client_data/",),
        ),
        Case(
            "loss-client-cache-flipped",
            cls,
            "train",
            RESUME,
            edit_file("client_data/client_0.tfrecord", lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:]),
            expect="refuse|warn",
            rounds=3,
            may_change=("client_data/",),
        ),
    ]


def resume_loss_cases():
    cls = "silent loss on resume"
    return [
        Case(
            "loss-client-backup-kept",
            cls,
            "train",
            (*RESUME, "--keep_rounds=1"),
            copy("clients/0", "clients/0.bak"),
            expect="accept",
            rounds=3,
            may_change=("clients/0/", "clients/1/", "clients/2/", "clients/manifest_", "server/"),
        ),
        Case(
            "loss-user-file-in-server",
            cls,
            "train",
            RESUME,
            write_file("server/notes.txt", b"mine"),
            expect="accept",
            rounds=3,
        ),
        Case(
            "loss-user-file-in-run", cls, "train", RESUME, write_file("README.txt", b"mine"), expect="accept", rounds=3
        ),
        Case(
            "loss-server-round-deleted",
            cls,
            "train",
            RESUME,
            delete("server/program_state_2"),
            expect="accept|warn",
            rounds=3,
        ),
        Case("loss-client-state-deleted", cls, "train", RESUME, delete("clients/0/state_00002.npz")),
        Case(
            "loss-client-manifest-deleted",
            cls,
            "train",
            RESUME,
            delete("clients/manifest_00002.json"),
            expect="refuse|accept|warn",
            rounds=3,
        ),
        Case("loss-config-deleted", cls, "train", RESUME, delete("config.json")),
        Case("loss-tensorboard-deleted", cls, "train", RESUME, delete("tensorboard"), expect="accept|warn", rounds=3),
        Case("loss-captures-deleted", cls, "train", RESUME, delete("captures"), expect="accept", rounds=3),
        Case("loss-demo-into-training-run", cls, "demo", ("--root_dir={run}", *DEMO)),
        Case(
            "loss-train-on-demo-runs",
            cls,
            "train",
            ("--root_dir={tmp}/demo", *RUN, "--rounds=2"),
            write_file("demo/fedkl/config.json", b'{"algorithm": "fedkl"}', under_run=False),
        ),
    ]


def traceback_cases():
    cls = "files replaced, config.json, read-only"
    directories = ["clients", "server", "manifests", "tensorboard", "client_data", "captures"]
    files = [
        "metrics.csv",
        "config.json",
        "lock",
        "clients/0/key",
        "clients/0/state_00002.npz",
        "client_data/client_0.tfrecord",
        "manifests/manifest_00002.json",
        "clients/manifest_00002.json",
    ]
    configs = {
        "list": b"[]",
        "null": b"null",
        "string": b'"fedkl"',
        "number": b"3",
        "empty-object": b"{}",
        "cut": b'{"algorithm": "fed',
        "binary": bytes(range(256)),
        "empty": b"",
        "wrong-type": None,
        "unknown-field": None,
    }
    cases = [Case(f"dir-is-a-file-{d}", cls, "train", RESUME, replace_by_file(d)) for d in directories]
    cases += [Case(f"file-is-a-dir-{f.replace('/', '-')}", cls, "train", RESUME, replace_by_dir(f)) for f in files]
    cases.append(Case("file-is-a-dir-server-round", cls, "train", RESUME, replace_by_file("server/program_state_2")))
    for name, data in configs.items():
        setup = write_file("config.json", data) if data is not None else None
        cases.append(Case(f"config-{name}", cls, "train", RESUME, setup))
    cases[-2] = dataclasses.replace(cases[-2], setup=edit_config(lambda c: {**c, "num_clients": "three"}))
    cases[-1] = dataclasses.replace(cases[-1], setup=edit_config(lambda c: {**c, "colour": "blue"}))
    cases.append(Case("config-list-evaluate", cls, "evaluate", EVALUATE, write_file("config.json", b"[]")))
    for name in ("metrics.csv", "clients", "server", "", "manifests", "tensorboard", "client_data", "clients/0"):
        cases.append(Case(f"read-only-{name.replace('/', '-') or 'run'}", cls, "train", RESUME, immutable(name)))
    cases.append(
        Case("read-only-config", cls, "train", RESUME, immutable("config.json"), expect="refuse|accept", rounds=3)
    )
    return cases


def capture_cases():
    cls = "bad captures"
    return [
        Case("capture-float64", cls, "attack", ATTACK_CAPTURE, edit_capture(_float64)),
        Case("capture-nan-update", cls, "attack", ATTACK_CAPTURE, edit_capture(_nan_update)),
        Case("capture-update-missing", cls, "attack", ATTACK_CAPTURE, edit_capture(_drop_update)),
        Case(
            "capture-offline-ground-truth",
            cls,
            "attack",
            (*ATTACK_CAPTURE[:2], "--iterations=1", "--out_dir={tmp}/out"),
            edit_capture(_offline_ground_truth),
        ),
        Case("capture-meta-not-json", cls, "attack", ATTACK_CAPTURE, edit_capture(lambda arrays, meta: meta.clear())),
        Case("capture-truncated", cls, "attack", ATTACK_CAPTURE, edit_file(CAPTURE, lambda d: d[: len(d) // 2])),
        Case("capture-text", cls, "attack", ATTACK_CAPTURE, write_file(CAPTURE, b"not a capture")),
        Case("capture-a-directory", cls, "attack", ATTACK_CAPTURE, replace_by_dir(CAPTURE)),
        Case("capture-missing", cls, "attack", ATTACK_CAPTURE, delete(CAPTURE)),
    ]


def concurrency_and_sigint_cases():
    writers = "concurrent writers"
    four = ("--root_dir={run}", *RUN, "--rounds=4")
    return [
        Case("writers-resume", writers, "train", four, kind="writers", rounds=4),
        Case(
            "writers-new-run",
            writers,
            "train",
            ("--root_dir={run}", *RUN, "--rounds=2"),
            kind="writers",
            rounds=2,
            copy=False,
        ),
        Case("writers-train-and-evaluate", writers, "train", four, kind="reader", rounds=4),
        Case(
            "sigint-train-in-a-round",
            "SIGINT",
            "train",
            ("--root_dir={run}", *RUN, "--rounds=6", "--keep_rounds=10"),
            kind="sigint",
            rounds=6,
        ),
        Case(
            "sigint-train-at-start-up",
            "SIGINT",
            "train",
            ("--root_dir={run}", *RUN, "--rounds=3"),
            kind="sigint",
            rounds=3,
        ),
    ]


CASES = (
    train_flag_cases()
    + other_flag_cases()
    + out_path_cases()
    + key_cases()
    + resume_loss_cases()
    + metrics_cases()
    + client_cache_cases()
    + traceback_cases()
    + capture_cases()
    + concurrency_and_sigint_cases()
)
assert len({c.id for c in CASES}) == len(CASES), "case ids repeat"


def _arguments(case, scratch):
    return [a.format(run=os.path.join(scratch, "run"), tmp=scratch) for a in case.args]


def execute(case, tree, scratch, log, timeout, run_binary, lines_of):
    """Runs `case` (its files set up in `scratch`), the output of its i-th process to `log`.format(i); (exit
    codes, output lines)."""
    args = _arguments(case, scratch)
    if case.kind == "plain":
        return [run_binary(tree, case.binary, args, log.format(0), timeout)], lines_of(log.format(0))
    if case.kind in ("writers", "reader"):
        second = (
            ("train", args)
            if case.kind == "writers"
            else ("evaluate", _arguments(dataclasses.replace(case, args=EVALUATE), scratch))
        )
        codes = [None, None]

        def start(i, binary, binary_args):
            codes[i] = run_binary(tree, binary, binary_args, log.format(i), timeout)

        threads = [
            threading.Thread(target=start, args=(0, case.binary, args)),
            threading.Thread(target=start, args=(1, *second)),
        ]
        for thread in threads:
            thread.start()
            time.sleep(0 if case.kind == "writers" else 15)  # the reader starts once training is under way
        for thread in threads:
            thread.join()
        return codes, lines_of(log.format(0)) + lines_of(log.format(1))
    interrupted = run_binary(tree, case.binary, args, log.format(0), timeout, _interrupt_after(case, scratch))
    resumed = run_binary(tree, case.binary, args, log.format(1), timeout)
    return [interrupted, resumed], lines_of(log.format(0)) + lines_of(log.format(1))


def _interrupt_after(case, scratch):
    """on_start of a SIGINT case: SIGINT once round 3's client states are saved (in a round), or at 3 s (while
    TensorFlow loads)."""
    marker = os.path.join(scratch, "run", "clients", "manifest_00003.json")

    def interrupt(process):
        deadline = time.time() + (300 if case.rounds > 3 else 3)
        while time.time() < deadline and process.poll() is None and (case.rounds <= 3 or not os.path.exists(marker)):
            time.sleep(0.2)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)

    return interrupt


def classify_special(case, codes, errors, lost):
    """(outcome, why) of a writers, reader or SIGINT case (no traceback, none timed out)."""
    if lost:
        return "data lost", f"lost: {lost[:5]}"
    if case.kind == "writers":
        if sorted(codes) == [0, 1] and len(errors) == 1:
            return "ok", errors[0]
        return ("accepted silently" if codes == [0, 0] else "other"), f"exit codes {codes}, errors {errors[:2]}"
    if case.kind == "reader":
        if codes[0] == 0 and (codes[1] == 0 or (codes[1] == 1 and len(errors) == 1)):
            return "ok", (errors or ["evaluate read a complete round"])[0]
        return "other", f"exit codes {codes}, errors {errors[:2]}"
    if codes[0] != 0 and codes[1] == 0 and len(errors) == 1:
        return "ok", errors[0]
    return "other", f"exit codes {codes}, errors {errors[:2]}"
