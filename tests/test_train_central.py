import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "tff_programs.train_central", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_trains_and_reports_own_and_random_key_accuracy(tmp_path):
    out = tmp_path / "result.json"
    result = _run("--dataset=digits", "--epochs=1", "--key_dim=16", "--random_keys=2", f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert 0.0 <= report["test_accuracy"] <= 1.0 and len(report["test_accuracy_random_keys"]) == 2
    assert report["test_accuracy_random_key_mean"] == sum(report["test_accuracy_random_keys"]) / 2
    assert report["lock"] is True and report["epochs"] == 1


def test_public_cut_and_accuracy_by_epoch(tmp_path):
    out = tmp_path / "result.json"
    result = _run(
        "--dataset=digits", "--epochs=2", "--key_dim=16", "--random_keys=1", "--public_size=100", f"--out={out}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["evaluation_examples"] == 360 - 100  # digits' test split minus evaluate's public cut
    assert sorted(report["accuracy_by_epoch"]) == ["1", "2"]
    assert report["test_accuracy"] == report["accuracy_by_epoch"]["2"]


def test_bad_flags_are_one_clear_line():
    for args, message in [
        (["--epochs=0"], "epochs"),
        (["--model=alexnet"], "model"),
        (["--no_such_flag"], "no_such_flag"),
        (["--learning_rate=-1"], "learning_rate"),
        (["--public_size=-1"], "public_size"),
        (["stray"], "unexpected arguments"),
    ]:
        result = _run(*args)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert message in result.stderr
