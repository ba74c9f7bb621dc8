"""The attack binary: flag validation gives one clear line."""

import subprocess
import sys


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
