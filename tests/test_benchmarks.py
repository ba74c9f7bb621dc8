"""The benchmark runner's conventions and the summary/report generation, on synthetic JSONs."""

import json
import os
import subprocess
import types

from absl import flags
import numpy as np
import pytest

from experiments import cells, common, run
from experiments.perf import torch_dlg_reference
from experiments.report import document as report
from experiments.report import tables


def _payload(value=1.5):
    return {
        "settings": {"repeats": 3},
        "results": {"ratio": value},
        "tables": [{"title": "T", "columns": ["a", "b"], "rows": [["x", value]]}],
        "headline": [{"metric": "speed ratio", "value": value, "unit": "x", "target": ">= 1.0x", "met": value >= 1}],
        "notes": ["a note"],
    }


def _write(directory, name, doc):
    with open(os.path.join(directory, f"{name}.json"), "w") as f:
        json.dump(doc, f)


def test_validate_payload_fills_defaults_and_rejects_bad_payloads():
    filled = common.validate_payload("b", {"results": {"x": 1}})
    assert filled == {"settings": {}, "results": {"x": 1}, "tables": [], "headline": [], "notes": []}
    with pytest.raises(ValueError, match="unknown payload keys"):
        common.validate_payload("b", {"results": {}, "figures": []})
    with pytest.raises(ValueError, match="no 'results'"):
        common.validate_payload("b", {"settings": {}})
    with pytest.raises(ValueError, match="row of 1 cells"):
        common.validate_payload("b", {"results": {}, "tables": [{"title": "t", "columns": ["a", "b"], "rows": [[1]]}]})
    with pytest.raises(TypeError):
        common.validate_payload("b", [1, 2])


def test_write_result_writes_the_envelope(tmp_path):
    path = common.write_result(
        "demo", _payload(), quick=True, results_dir=str(tmp_path), command="cmd --x", duration_s=2.04
    )
    assert path == os.path.join(str(tmp_path), "demo.json")
    doc = common.load_results(str(tmp_path))["demo"]
    assert doc["benchmark"] == "demo" and doc["command"] == "cmd --x" and doc["quick"] is True
    assert doc["duration_s"] == 2.0 and doc["results"] == {"ratio": 1.5}
    assert {"cpu", "logical_cpus", "python", "shared_machine"} <= set(doc["machine"])
    assert doc["git_commit"] and doc["date"].endswith("Z")


def test_summarize():
    stats = common.summarize([4.0, 1.0, 3.0, 2.0])
    assert stats == {"median": 2.5, "q1": 1.75, "q3": 3.25, "min": 1.0, "max": 4.0, "n": 4}


def test_interleaved_timings_warm_up_then_time_every_variant_each_repeat():
    calls = []
    steps = {name: (lambda name=name: calls.append(name) or np.zeros(1)) for name in ("a", "b", "c")}
    times = common.interleaved_timings(
        steps, repeats=4, steps_per_block=2, warmup_steps=1, rng=np.random.default_rng(0)
    )
    assert calls[:3] == ["a", "b", "c"] and len(calls) == 3 + 4 * 3 * 2
    blocks = calls[3::2]  # the variant of each timed block
    assert all(sorted(blocks[i : i + 3]) == ["a", "b", "c"] for i in range(0, 12, 3))
    assert len({tuple(blocks[i : i + 3]) for i in range(0, 12, 3)}) > 1  # the order changes between repeats
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_run_in_process_uses_run_and_writes_json(tmp_path, monkeypatch):
    module = types.SimpleNamespace(run=lambda quick: _payload(2.0 if quick else 3.0))
    monkeypatch.setattr(run.importlib, "import_module", lambda name: module)
    path = run.run_in_process("fake", True, str(tmp_path), "python -m experiments.run --only=fake --quick")
    doc = json.load(open(path))
    assert doc["results"] == {"ratio": 2.0} and doc["command"].endswith("--quick") and doc["duration_s"] is not None


def test_run_in_process_rejects_a_module_without_entry_point(tmp_path, monkeypatch):
    monkeypatch.setattr(run.importlib, "import_module", lambda name: types.SimpleNamespace())
    with pytest.raises(AttributeError, match="neither run"):
        run.run_in_process("fake", False, str(tmp_path), "cmd")


def test_main_style_module_must_write_its_json(tmp_path, monkeypatch):
    calls = []

    def fake_subprocess_run(argv, **kwargs):
        calls.append(argv)
        if "--quick" not in argv:  # this fake 'module' writes its JSON only in full runs
            _write(str(tmp_path), "selfwriting", {"benchmark": "selfwriting", "results": {}})
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(run.subprocess, "run", fake_subprocess_run)
    monkeypatch.setattr(run.importlib, "import_module", lambda name: types.SimpleNamespace(main=lambda: None))
    assert run.run_in_process("selfwriting", False, str(tmp_path), "cmd").endswith("selfwriting.json")
    with pytest.raises(RuntimeError, match="did not write"):
        run.run_in_process("selfwriting", True, str(tmp_path), "cmd")
    assert calls[0][1:] == ["-m", "experiments.perf.selfwriting"]
    assert calls[1][1:] == ["-m", "experiments.perf.selfwriting", "--quick"]


def test_runner_skips_absent_modules_and_writes_the_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "module_present", lambda name: False)
    try:
        flags.FLAGS(["run", "--only=workers,scale", f"--results_dir={tmp_path}"])
        run.main(["run"])
    finally:
        flags.FLAGS.unparse_flags()
    out = capsys.readouterr().out
    assert "| workers | skipped | experiments/perf/workers.py is not in the tree yet |" in out
    summary = open(os.path.join(str(tmp_path), tables.SUMMARY_FILE)).read()
    assert "No benchmark has written a result yet." in summary and "`workers`" in summary


def test_quick_runs_default_to_their_own_results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "module_present", lambda name: False)
    monkeypatch.setattr(run, "QUICK_RESULTS_DIR", str(tmp_path / "quick"))
    try:
        flags.FLAGS(["run", "--only=workers", "--quick"])
        run.main(["run"])
    finally:
        flags.FLAGS.unparse_flags()
    assert os.path.exists(os.path.join(str(tmp_path), "quick", tables.SUMMARY_FILE))


def test_summary_lists_headlines_loose_files_and_missing_benchmarks(tmp_path):
    common.write_result("torch_compare", _payload(0.8), quick=False, results_dir=str(tmp_path), command="c1")
    _write(str(tmp_path), "central_lenet", {"model": "lenet", "test_accuracy": 0.9})
    with open(os.path.join(str(tmp_path), "broken.json"), "w") as f:
        f.write("{not json")
    path = tables.write_summary(str(tmp_path))
    text = open(path).read()
    assert "| torch_compare | speed ratio | 0.8 | x | >= 1.0x (not met) | full, " in text
    assert "`central_lenet.json`" in text and "Unreadable result files: `broken.json`" in text
    assert "No result yet: `keylock_overhead`" in text and "Command: `c1`" in text


def test_fmt():
    assert tables.fmt(None) == "–" and tables.fmt(True) == "yes" and tables.fmt(0.000123) == "0.000123"
    assert tables.fmt(1234.567) == "1234.6" and tables.fmt(1.23456) == "1.235" and tables.fmt("a|b") == "a\\|b"
    assert tables.fmt({"a": 1, "b": [1, 2]}) == "{a: 1, b: 1, 2}"


def test_the_report_answers_each_question_from_the_files_present(tmp_path):
    common.write_result("keylock_overhead", _payload(1.02), quick=False, results_dir=str(tmp_path), command="ko")
    common.write_result(
        "torch_compare", _payload(0.8), quick=False, results_dir=str(tmp_path), command="python -m benchmarks.run"
    )
    _write(str(tmp_path), "mystery", {"value": 7})
    (tmp_path / "keylock_overhead.md").write_text("page")
    out = report.write_report(str(tmp_path), os.path.join(str(tmp_path), "REPORT.md"))
    text = open(out).read()
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == [
        "## 1. Does the paper's lock hold?",
        "## 2. Where do attacks work?",
        "## 3. What does the key protect?",
        "## 4. What does each candidate cost?",
        "## 5. Speed and scale",
        "## Sources",
    ]
    assert "No results yet (`results/regimes.json`)." in text
    assert "Source: `results/keylock_overhead.json` (every table: `results/keylock_overhead.md`); `ko`." in text
    assert "| x | 1.02 |" in text  # keylock_overhead's table 0, as it is
    assert "| torch_compare | speed ratio | 0.8 | x | >= 1.0x (not met) |" in text  # the speed headlines
    assert "| torch_compare | `python -m experiments.run` |" in text  # a moved module by its name today
    assert "mystery" not in text and "- a note" not in text  # no data dumps: notes and loose files stay in results/


def test_the_attack_pivot_pools_each_settings_seeds_per_threat():
    entry = lambda k, n: {"n": n, "ssim": {"recovered": k, "n": n, "rate": k / n}}  # noqa: E731
    doc = {
        "results": {
            "by_setting": {
                "ig_fashion_mnist": {"none": entry(23, 30), "adaptive": entry(19, 30)},
                "ig_digits": {"none": entry(9, 10)},
                "grnn_fashion_mnist_private_lock": {"adaptive-key": entry(0, 30)},
            },
            "label_floor": {"ig_fashion_mnist": entry(3, 30)},
        }
    }
    columns, rows = report.attack_pivot(doc)
    assert columns == ["setting", "labels alone (class mean)", *report.THREATS]
    assert rows == [
        ["ig_fashion_mnist", "10 % (3/30)", "77 % (23/30)", "–", "–", "63 % (19/30)", "–"],
        ["grnn_fashion_mnist_private_lock", "–", "–", "–", "–", "–", "0 % (0/30)"],
    ]


def test_compare_with_reference():
    reference = {
        "per_image": [
            {"index": 0, "seconds_to_target": 1.0, "evaluations_to_target": 100, "final_psnr": 75.0},
            {"index": 1, "seconds_to_target": None, "evaluations_to_target": None, "final_psnr": 12.0},
        ],
        "success_rate": 0.5,
    }
    ours = [
        {"index": 0, "seconds_to_target": 3.0, "evaluations_to_target": 150, "final_psnr": 40.0},
        {"index": 1, "seconds_to_target": 2.0, "evaluations_to_target": 90, "final_psnr": 31.0},
    ]
    comparison = torch_dlg_reference.compare_with_reference(reference, ours)
    assert comparison["median_seconds_ratio"] == 3.0 and comparison["median_evaluations_ratio"] == 1.5
    assert comparison["per_image"][1]["seconds_to_target_ratio"] is None
    assert comparison["success_rate_ours"] == 1.0 and comparison["success_rate_reference"] == 0.5
    with pytest.raises(ValueError, match="not in the reference"):
        torch_dlg_reference.compare_with_reference(reference, [dict(ours[0], index=9)])


_TORCH_MISSING = not os.path.exists(torch_dlg_reference.TORCH_PYTHON)


@pytest.mark.skipif(_TORCH_MISSING, reason="needs .venv-torch (make torch-venv)")
def test_torch_port_has_the_same_parameters_as_ours():
    import numpy as np

    from experiments.perf import torch_compare
    from tfkl import models

    worker = torch_compare.torch_worker(1, 1)
    try:
        for name in ("lenet", "resnet20"):
            torch_count = worker.ask(cmd="setup", model=name)["parameters"]
            model = models.build(name, (32, 32, 3), 10, lock=True, seed=0)
            assert torch_count == sum(int(np.prod(v.shape)) for v in model.trainable_variables)
            assert worker.ask(cmd="time", model=name, steps=1)["seconds_per_step"] > 0
    finally:
        worker.close()


@pytest.mark.skipif(_TORCH_MISSING, reason="needs .venv-torch (make torch-venv)")
def test_torch_dlg_script_writes_per_image_records():
    import numpy as np

    rng = np.random.default_rng(0)
    images, labels = rng.random((2, 28, 28, 1), dtype=np.float32), np.array([3, 7])
    settings = dict(torch_dlg_reference.reference_settings(quick=True), lbfgs_steps=2)
    doc = torch_dlg_reference.run_torch_dlg(images, labels, settings)
    assert [r["position"] for r in doc["records"]] == [0, 1] and doc["image_shape"] == [1, 28, 28]
    for record in doc["records"]:
        assert record["evaluations"] >= 1 and isinstance(record["success"], bool)
        assert (record["seconds_to_target"] is None) == (record["evaluations_to_target"] is None)


def test_table1_runs_each_command_once_and_reruns_when_it_changes(tmp_path):
    import sys

    from experiments.studies import table1

    out, counter = str(tmp_path / "out.json"), tmp_path / "count"
    code = (
        f"import json, pathlib; p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) + 1 if p.exists() else 1; "
        f"p.write_text(str(n)); json.dump({{'n': n}}, open({out!r}, 'w'))"
    )
    argvs = [[sys.executable, "-c", code]]
    doc, seconds = table1._run_cached(argvs, out, log=lambda _: None)
    assert doc == {"n": 1} and seconds >= 0
    assert table1._run_cached(argvs, out, log=lambda _: None) == (doc, seconds)  # cached
    changed = [[sys.executable, "-c", code + "  # other flags"]]
    assert table1._run_cached(changed, out, log=lambda _: None, cached_only=True) == (None, None)
    assert table1._run_cached(changed, out, log=lambda _: None)[0] == {"n": 2}


def test_table1_payload_aggregates_seeds_and_variants():
    from experiments.studies import table1

    keys = {entry: 0.5 for entry in table1.KEY_ENTRIES}
    keys["e_lock_recovery_100"] = 0.4
    columns = table1.COLUMNS + ("fedkl_local_statistics",)
    per_seed = {
        s: {c: {"accuracy": acc, "curve": {1: acc}, "seconds": 30.0} for c, acc in zip(columns, accs)}
        for s, accs in ((0, (0.8, 0.9, 0.85, 0.86, 0.95)), (1, (0.8, 0.9, 0.85, 0.84, 0.97)))
    }
    plain = {s: {c: runs[c] for c in table1.COLUMNS} for s, runs in per_seed.items()}
    settings = {"x": {"epochs": 3, "variants": ("fedkl_local_statistics",)}, "y": {"epochs": 3}}
    variant_keys = dict(keys, e_lock_recovery_100=0.9)
    results = {
        "x": {
            "per_seed": per_seed,
            "key_matrix": {0: keys, 1: keys},
            "variant_key_matrix": {"fedkl_local_statistics": {0: variant_keys, 1: variant_keys}},
        },
        "y": {"per_seed": plain, "key_matrix": {0: keys, 1: keys}},
    }
    payload = common.validate_payload("table1", table1._payload(settings, results, quick=True))
    with_variant, without = payload["tables"][0]["rows"]
    assert with_variant[:3] == ["x", 3, 2] and with_variant[3] == "80.00 ± 0.00" and with_variant[6] == "85.00 ± 1.00"
    assert with_variant[7] == "0.00 ± 1.00" and with_variant[8:] == ["96.00 ± 1.00", "not run", 2.5]
    assert without[8:] == ["not run", "not run", 2.0]
    assert payload["headline"][0]["met"] is True
    key_rows = payload["tables"][1]["rows"]
    assert [r[0] for r in key_rows] == ["x", "x, fedkl_local_statistics", "y"]
    assert key_rows[0][-1] == "40.00 ± 0.00" and key_rows[1][-1] == "90.00 ± 0.00"


def test_table1_variant_is_fedkl_with_its_own_flags_and_directory():
    from experiments.studies import table1

    setting = dict(model="resnet20", dataset="digits", epochs=2, seeds=(0,), variants=("fedkl_local_statistics",))
    commands = table1._commands(setting, 0, "d")
    train = commands["fedkl_local_statistics"][0][0]
    assert "--algorithm=fedkl" in train and "--root_dir=d/fedkl_local_statistics" in train
    assert train[-1] == "--statistics=local" and "--statistics=local" not in commands["fedkl"][0][0]


def test_figures_are_drawn_from_the_results_only(tmp_path):
    from experiments.report import figures

    results, grids = tmp_path / "results", tmp_path / "grids"
    results.mkdir()
    curve = {"1": 0.5, "2": 0.6}
    per_seed = {"0": {c: {"accuracy": 0.6, "curve": curve} for c in figures.CURVE_LABELS}}
    _write(str(results), "table1", {"results": {"lenet_digits": {"per_seed": per_seed}}})
    _write(str(results), "attacks_dlg_digits", {"results": {}})
    (grids / "dlg_digits").mkdir(parents=True)
    (grids / "dlg_digits" / "grid.png").write_bytes(b"png")
    (grids / "ig_digits").mkdir()
    (grids / "ig_digits" / "grid.png").write_bytes(b"png")  # no result file: not copied
    notes = []
    written = figures.draw_all(str(results), str(results / "figures"), str(grids), str(grids), log=notes.append)
    assert sorted(os.path.basename(p) for p in written) == ["accuracy_curves.png", "grid_dlg_digits.png"]
    assert (results / "figures" / "accuracy_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert notes == [
        "skipped privacy_utility.png: no privacy_utility.json",
        "skipped privacy_over_rounds.png: no regimes.json",
        "skipped candidates_frontier.png: no candidates.json",
        "skipped privacy_pooled_rounds.png: no rounds.json",
    ]
    lines = report.figures_markdown(str(results / "figures"), str(tmp_path))
    assert "![accuracy_curves](results/figures/accuracy_curves.png)" in lines


def test_privacy_over_rounds_and_regime_grids_come_from_regimes_json(tmp_path):
    from experiments.report import figures

    results, grids = tmp_path / "results", tmp_path / "regimes"
    results.mkdir()
    rate = {"ssim": {"rate": 0.5, "low": 0.3, "high": 0.7}}
    regimes = {
        name: {"label_floor": {"success": rate}, "none": {"success": rate}, "adaptive": {"success": rate}}
        for name in ("T1", "T5", "T1-U8")
    }
    regimes["G8"] = {"none": {"success": rate}}
    _write(str(results), "regimes", {"results": regimes})
    (grids / "G8").mkdir(parents=True)
    (grids / "G8" / "grid_seed0.png").write_bytes(b"png")
    written = figures.draw_all(str(results), str(results / "figures"), str(tmp_path / "none"), str(grids), log=print)
    assert sorted(os.path.basename(p) for p in written) == ["grid_regime_G8.png", "privacy_over_rounds.png"]
    assert (results / "figures" / "privacy_over_rounds.png").read_bytes()[:4] == b"\x89PNG"


def test_privacy_over_rounds_gives_a_threat_one_colour_and_label_in_both_panels(tmp_path, monkeypatch):
    from experiments.report import figures

    rate = {"success": {"ssim": {"rate": 0.5, "low": 0.3, "high": 0.7}}}
    doc = {
        "results": {
            "T1": {"none": rate, "adaptive": rate},
            "T1-U8": {"order-oracle": rate, "adaptive": rate},  # the update panel has a threat the other lacks
        }
    }
    drawn = []
    monkeypatch.setattr(figures.plt, "close", drawn.append)  # keep the figure to read its legends
    figures.privacy_over_rounds(doc, str(tmp_path / "rounds.png"))
    batch, update = (
        {label: handle.lines[0].get_color() for handle, label in zip(*axis.get_legend_handles_labels())}
        for axis in drawn[0].axes
    )
    assert list(batch) == ["FedAvg, none", "FedKL, adaptive"]
    assert list(update) == ["FedAvg, none, known step order (oracle)", "FedKL, adaptive"]
    assert batch["FedKL, adaptive"] == update["FedKL, adaptive"]
    assert len({*batch.values(), *update.values()}) == 3


def test_table6_payload_pools_seeds_and_merges_the_threat_experiments():
    from experiments.studies import attack_quality

    def report(psnr, aligned, threats):
        per_image = {m: [0.5, 0.5] for m in attack_quality.TABLE6_METRICS}
        per_image.update(psnr=psnr, aligned_psnr=aligned, label_accuracy=[1.0, 1.0])
        return {"settings": {}, "results": {t: {"per_image": dict(per_image)} for t in threats}}

    reports = {
        ("dlg_x", 0): report([60.0, 70.0], [60.0, 70.0], ["none", "fixed-key"]),
        ("dlg_x", 1): report([80.0, 90.0], [10.0, 12.0], ["none", "fixed-key"]),
        ("dlg_x_adaptive_key", 0): report([5.0, 5.0], [13.0, 13.0], ["adaptive-key"]),
        ("dlg_x_private_lock", 0): report([5.0, 5.0], [11.0, 11.0], ["adaptive-key"]),
    }
    payload = common.validate_payload("table6", attack_quality.table6_payload(reports))
    (row,) = payload["tables"][0]["rows"]
    cells = dict(zip(payload["tables"][0]["columns"], row))
    assert cells["experiment"] == "dlg_x" and cells["none"] == "75.0 ± 11.2 (0.50) [2]"
    assert cells["fixed-key"] == "38.0 ± 27.2 (0.50) [2]"  # aligned PSNR pooled over both seeds' images
    assert cells["adaptive-key"] == "13.0 ± 0.0 (0.50) [1]" and cells["oracle"] == "–"
    assert cells["adaptive-key (private lock)"] == "11.0 ± 0.0 (0.50) [1]"
    assert payload["results"]["dlg_x"]["none"]["psnr"]["seed_means"] == [65.0, 85.0]


def _key_table_row(own, random_key, recovery, scratch):
    from experiments.studies import key_table

    row = {key: own for _, key in key_table.ENTRIES}
    row.update(b_own_lock_random_key=random_key, own=own)
    for size in key_table.SETTING["public_sizes"]:
        row.update({f"recovery_{size}": recovery, f"scratch_{size}": scratch, f"gain_{size}": recovery - scratch})
    return row


def test_key_table_payload_marks_targets_and_partial_runs():
    from experiments.studies import key_table

    rows = {
        "fedkl_uniform": {0: _key_table_row(0.81, 0.82, 0.79, 0.66)},
        "fedkl_gaussian": {0: _key_table_row(0.80, 0.15, 0.68, 0.66), 1: _key_table_row(0.80, 0.35, 0.70, 0.66)},
        "fedavg_norm": {0: {"own": 0.84}},
    }
    names = ["fedkl_uniform", "fedkl_gaussian", "fedavg_norm", "fedkl_rademacher"]
    payload = key_table.payload(
        key_table.SETTING, [0, 1], names, rows, {"fedkl_uniform": 5.0}, ["fedkl_rademacher seed 0"], quick=False
    )
    payload = common.validate_payload("key_table", payload)
    table = payload["tables"][0]
    assert "PARTIAL" in table["title"] and payload["results"]["partial"]
    assert any("fedkl_rademacher seed 0" in note and "--key_table_seeds=0,1" in note for note in payload["notes"])
    by_label = {row[0]: row for row in table["rows"]}
    uniform = by_label[key_table.CONFIGS["fedkl_uniform"][0]]
    gaussian = by_label[key_table.CONFIGS["fedkl_gaussian"][0]]
    assert uniform[-2:] == ["not reached", "not reached"]  # 82 % > 20 %; +13 pp > 5 pp
    assert gaussian[1] == 2 and gaussian[3] == "25.0 ± 10.0" and gaussian[-2:] == ["not reached", "reached"]
    assert by_label[key_table.CONFIGS["fedavg_norm"][0]][2] == "84.0"
    comparisons = payload["results"]["comparisons"]
    assert comparisons["fedkl_uniform_minus_control_pp"] == pytest.approx(-3.0)
    assert {item["metric"]: item["met"] for item in payload["headline"]}[
        "fedkl_gaussian: lock recovery - from scratch, 100 public examples"
    ]


@pytest.mark.slow
def test_key_table_command_on_a_tiny_setting(tmp_path):
    """The command end to end (digits, 2 rounds, key_dim 16): two configurations, then a rerun from the cache."""
    from experiments.studies import key_table

    out = tmp_path / "key_table.json"
    argv = [
        "-m",
        "experiments.studies.key_table",
        "--quick",
        "--key_table_configs=fedkl_gaussian,fedavg_norm",
        f"--key_table_dir={tmp_path / 'runs'}",
        f"--key_table_out={out}",
    ]
    env = dict(os.environ, PYTHONPATH=common.REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    with open(tmp_path / "log", "w") as log:
        code = subprocess.run([os.sys.executable, *argv], cwd=common.REPO_ROOT, env=env, stdout=log, stderr=log)
    assert code.returncode == 0, (tmp_path / "log").read_text()[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "key_table" and not doc["results"]["partial"] and doc["quick"]
    rows = doc["tables"][0]["rows"]
    assert [row[0] for row in rows] == [key_table.CONFIGS[n][0] for n in ("fedkl_gaussian", "fedavg_norm")]
    entry = doc["results"]["per_run"]["fedkl_gaussian"]["0"]
    assert {"a_own_key_and_lock", "b_own_lock_random_key", "recovery_20", "scratch_20", "gain_100"} <= set(entry)
    assert (tmp_path / "key_table.md").read_text().startswith("# Key table")
    started = len([line for line in (tmp_path / "log").read_text().splitlines() if line.startswith("tff_programs")])
    with open(tmp_path / "log2", "w") as log:
        subprocess.run([os.sys.executable, *argv], cwd=common.REPO_ROOT, env=env, stdout=log, stderr=log, check=True)
    assert started == 4 and "tff_programs" not in (tmp_path / "log2").read_text()  # all cached


def test_gradient_sharpness_measures_distances_from_the_true_image():
    import tensorflow as tf

    from experiments.studies import gradient_sharpness

    smooth = np.random.default_rng(0).uniform(0, 1, (2, 4, 4, 1)).astype(np.float32)
    images, labels = tf.image.resize(smooth, (32, 32)).numpy(), np.array([1, 3])
    batch_statistics = gradient_sharpness.distances("resnet20", True, images, labels)
    moving_statistics = gradient_sharpness.distances("resnet20", False, images, labels)
    assert batch_statistics.shape == (2, len(gradient_sharpness.NOISE_LEVELS) + 1)
    assert np.all(np.diff(batch_statistics[:, :-1], axis=1) > 0)  # noisier images, farther gradients
    assert np.all(batch_statistics[:, 0] > 10 * moving_statistics[:, 0])


def test_tables_are_not_rewritten_from_fewer_results_than_they_hold(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    summary = dict(n=8, seeds=[0])
    payload = dict(results={"U8": {"none": summary, "oracle": summary}}, tables=[], headline=[], notes=[])
    cells.publish("bench", payload, 1.0, "records")
    with open(tmp_path / "bench.json", "rb") as f:
        before = f.read()
    fewer = dict(payload, results={"U8": {"none": summary, "oracle": dict(n=4, seeds=[0])}})
    with pytest.raises(
        RuntimeError, match=r"records lacks what results/bench.json was made from \(U8/oracle: 8 images, now 4\);"
    ):
        cells.publish("bench", fewer, 1.0, "records")
    with pytest.raises(RuntimeError, match=r"U8/oracle: 8 images, now 0"):
        cells.publish("bench", dict(payload, results={"U8": {"none": summary}}), 1.0, "records")
    with open(tmp_path / "bench.json", "rb") as f:
        assert f.read() == before  # nothing lost
    more = dict(payload, results={"U8": {"none": dict(n=16, seeds=[0, 1]), "oracle": summary}})
    cells.publish("bench", more, 1.0, "records")  # more images, or the same: written
    with open(tmp_path / "bench.json") as f:
        assert json.load(f)["results"]["U8"]["none"]["n"] == 16
