"""The attack binary: flag validation gives one clear line."""

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "tff_programs.attack", *args], capture_output=True, text=True,
                          timeout=120)


def test_bad_threat_is_one_clear_error():
    result = _run("--threat=foo")
    assert result.returncode != 0 and "--threat takes a comma-separated list" in result.stderr


def test_learning_rate_for_lbfgs_is_rejected():
    result = _run("--attack=idlg", "--learning_rate=0.1")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: --learning_rate")


def test_missing_capture_is_one_clear_error(tmp_path):
    result = _run(f"--capture={tmp_path / 'none.npz'}", "--threat=adaptive")
    assert result.returncode == 1 and "does not exist" in result.stderr.strip().splitlines()[-1]
