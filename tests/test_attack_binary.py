"""The attack binary: flag validation gives one clear line."""

import json
import subprocess
import sys

import pytest


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "tff_programs.attack", *args], capture_output=True, text=True, timeout=120
    )


def test_bad_threat_is_one_clear_error():
    result = _run("--threat=foo")
    assert result.returncode != 0 and "--threat takes a comma-separated list" in result.stderr


def test_learning_rate_for_lbfgs_is_rejected():
    result = _run("--attack=idlg", "--learning_rate=0.1")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: --learning_rate")


def test_missing_capture_is_one_clear_error(tmp_path):
    result = _run(f"--capture={tmp_path / 'none.npz'}", "--threat=adaptive")
    assert result.returncode == 1 and "does not exist" in result.stderr.strip().splitlines()[-1]


def test_capture_naming_another_input_shape_is_one_clear_error(tmp_path):
    from tfkl import capture, models, private

    model = models.build("lenet", (8, 8, 1), 4, lock=True)
    meta = capture.build_meta(
        model,
        round_num=1,
        client_id="0",
        num_examples=1,
        num_steps=1,
        batch_size=1,
        local_epochs=1,
        learning_rate=0.01,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
    )
    shared = [v.numpy() for v in private.shared_variables(model)]
    path = str(tmp_path / "c.npz")
    capture.save_capture(path, dict(meta, input_shape=[16, 16, 1]), shared, shared)
    result = _run(f"--capture={path}", "--threat=adaptive", "--noscore", f"--out_dir={tmp_path / 'out'}")
    last = result.stderr.strip().splitlines()[-1]
    assert (
        result.returncode == 1
        and last.startswith("error: the capture's architecture does not fit")
        and "input_shape" in last
    )


def _captures(tmp_path, client_ids):
    """Captures of an 8x8 locked LeNet's clients, one per id (a local step on two images each)."""
    import numpy as np

    from attacks import cases
    from tfkl import models

    model = models.build("lenet", (8, 8, 1), 4, lock=True, seed=1)
    paths = []
    for index, client_id in enumerate(client_ids):
        images = np.random.default_rng(index).uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
        path = str(tmp_path / f"round_{index + 1}_client_{client_id}.npz")
        cases.client_update_capture(model, images, np.array([0, 1]), path, batch_size=1, client_id=client_id)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_a_pool_of_one_clients_captures_is_attacked_together(tmp_path):
    paths = _captures(tmp_path, ["3", "3"])
    out = tmp_path / "out"
    args = ("--attack=ig", "--threat=adaptive", "--iterations=4", "--restarts=1", "--noscore", "--pool_drifts=0,1")
    result = _run("--pool=" + ",".join(paths), *args, f"--out_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "pool_metrics.json").read_text())
    assert set(metrics) == {"adaptive"} and len(metrics["adaptive"]["labels"]) == 4
    assert set(metrics["adaptive"]["held_out"]) == {"0.0", "1.0"}


def test_a_pool_mixing_clients_is_one_clear_error(tmp_path):
    paths = _captures(tmp_path, ["0", "1"])
    result = _run("--pool=" + ",".join(paths), "--threat=adaptive", "--noscore", f"--out_dir={tmp_path / 'out'}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1].startswith("error: ") and "one client's captures" in lines[-1]
    assert not any("Traceback" in line for line in lines)
