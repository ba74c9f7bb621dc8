"""The train/evaluate binaries as a user runs them: bad input gives one error line; kill -9 and resume."""

import json
import os
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import finish, kill_group, start_binary
from tff_programs import contexts
from tfkl.federated import run_dir
from tfkl.federated.config import build_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--dataset=digits", "--num_clients=3", "--batch_size=32", "--learning_rate=0.05", "--seeded_keys", "--seed=2"]


def error_lines(log):
    with open(log) as f:
        return [line for line in f.read().splitlines() if line.strip()]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num_clients=0"], "num_clients"),
        pytest.param(["--clients_per_round=5", "--num_clients=3"], "cannot exceed", marks=pytest.mark.slow),
        pytest.param(["--inject_nan=x"], "ROUND:CLIENT", marks=pytest.mark.slow),
        pytest.param(["--learning_rate=-1"], "positive", marks=pytest.mark.slow),
        (["--dp_clip=1.0", "--algorithm=fedavg"], "client_weighting=uniform"),
        (["--examples_per_client=0"], "--examples_per_client must be at least 1"),
        pytest.param(["--fresh_examples"], "fresh_examples needs examples_per_client", marks=pytest.mark.slow),
    ],
)
def test_bad_flags_give_one_error_line(tmp_path, args, message):
    log = str(tmp_path / "log")
    assert finish(start_binary("tff_programs.train", f"--root_dir={tmp_path / 'run'}", *args, log=log)) != 0
    lines = error_lines(log)
    assert any(message in line for line in lines) and not any("Traceback" in line for line in lines)
    assert len([line for line in lines if "rror" in line]) == 1
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_binaries_refuse_other_runs_root_dir_and_corrupt_state(tmp_path):
    root = str(tmp_path / "run")
    assert (
        finish(start_binary("tff_programs.train", f"--root_dir={root}", "--rounds=1", *TRAIN, log=str(tmp_path / "a")))
        == 0
    )
    before = sorted(os.listdir(root))
    log = str(tmp_path / "b")
    assert (
        finish(
            start_binary("tff_programs.train", f"--root_dir={root}", "--rounds=2", "--model=resnet20", *TRAIN, log=log)
        )
        == 1
    )
    assert error_lines(log) == [
        f"error: {root} holds another run (model: 'lenet' there, 'resnet20' here); use a new --root_dir"
    ]
    assert sorted(os.listdir(root)) == before
    with open(os.path.join(root, "clients", "0", "key"), "r+b") as f:
        f.seek(20)
        f.write(b"\x00\x01")
    log = str(tmp_path / "c")
    assert finish(start_binary("tff_programs.evaluate", f"--root_dir={root}", log=log)) == 1
    assert len(error_lines(log)) == 1 and "corrupt" in error_lines(log)[0]


@pytest.fixture
def tff_context():
    contexts.install_context()
    yield
    contexts.shutdown()


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted_run(tmp_path, tff_context):
    rounds = 6
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    assert (
        finish(
            start_binary(
                "tff_programs.train", f"--root_dir={full}", f"--rounds={rounds}", *TRAIN, log=str(tmp_path / "full.log")
            )
        )
        == 0
    )
    for attempt, wait_rows in enumerate((2, 4)):
        process = start_binary(
            "tff_programs.train",
            f"--root_dir={killed}",
            f"--rounds={rounds}",
            *TRAIN,
            log=str(tmp_path / f"killed{attempt}.log"),
        )
        metrics = os.path.join(killed, "metrics.csv")
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if os.path.exists(metrics) and sum(1 for _ in open(metrics)) > wait_rows:
                break
            time.sleep(0.05)
        time.sleep(0.1 * attempt)  # at a different point of the round each time
        assert process.poll() is None, "the run ended before it could be killed"
        kill_group(process)
    assert (
        finish(
            start_binary(
                "tff_programs.train",
                f"--root_dir={killed}",
                f"--rounds={rounds}",
                *TRAIN,
                log=str(tmp_path / "resumed.log"),
            )
        )
        == 0
    )
    config = run_dir.load_config(full)
    assert run_dir.load_config(killed) == config
    process = build_process(config)
    a, b = run_dir.restore(full, config, process), run_dir.restore(killed, config, process)
    assert a[2] == b[2] == rounds
    for x, y in zip(tf.nest.flatten(a[0]), tf.nest.flatten(b[0])):
        np.testing.assert_array_equal(x, y)
    for cid in a[1]:
        for x, y in zip(tf.nest.flatten(a[1][cid]), tf.nest.flatten(b[1][cid])):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_demo_trains_evaluates_and_captures(tmp_path):
    log = str(tmp_path / "demo.log")
    root = tmp_path / "demo"
    assert (
        finish(
            start_binary(
                "tff_programs.demo",
                f"--root_dir={root}",
                "--rounds=2",
                "--nobaseline",
                "--attack_iterations=20",
                log=log,
            )
        )
        == 0
    )
    result = run_dir.load_config(str(root / "fedkl"))
    assert result.algorithm == "fedkl"
    assert sorted(os.listdir(root / "fedkl" / "captures")) == [
        f"round_0000{r}_client_{c}.npz" for r in (1, 2) for c in range(3)
    ]
    with open(log) as f:
        text = f.read()
    assert "a_own_key_and_lock" in text and "e_lock_recovery_100" in text and "Traceback" not in text
    assert (root / "fedkl" / "evaluation.json").exists()
    # The attack step: both captured updates come from the same client (FedKL's and the FedAvg control's round);
    # each setting is scored, success rates first.
    assert (root / "attack" / "captures_grid.png").exists()
    with open(root / "attack" / "captures_metrics.json") as f:
        settings = json.load(f)
    assert set(settings) == {"fedavg-norm/none", "fedkl/fixed-key", "fedkl/adaptive"}
    assert all(e["success"]["n"] == e["num_examples"] and "psnr" in e["summary"] for e in settings.values())
    summary = text[text.index("== in short") :]
    assert "random key with the client's own lock weights" in summary and "from scratch" in summary
    assert (
        all(f"{threat} " in summary for threat in ("none", "fixed-key", "adaptive")) and "captures_grid.png" in summary
    )
