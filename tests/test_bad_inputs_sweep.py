"""The bad-input sweep's judge: how an outcome is classified, a case that cannot be set up, and the table."""

import json

from experiments.perf import bad_inputs_cases, bad_inputs_sweep


def _case(**options):
    return bad_inputs_cases.Case("c", "nonsense flags", "train", ("--x",), **options)


def test_one_error_line_with_nothing_changed_is_ok_and_anything_else_is_named():
    classify = bad_inputs_sweep.classify
    same = {"a": "1"}
    assert classify(_case(), [1], ["error: no"], same, same, "/r") == ("ok", "error: no")
    assert classify(_case(), [1], ["Traceback (most recent call last):"], same, same, "/r")[0] == "traceback"
    assert classify(_case(), [1], ["error: no"], same, {}, "/r")[0] == "data lost"  # a file it had is gone
    assert classify(_case(), [0], ["done"], same, same, "/r")[0] == "accepted silently"
    assert classify(_case(expect="warn"), [0], ["warning: clamped"], same, same, "/r") == ("ok", "warning: clamped")
    assert classify(_case(), [None], [], same, same, "/r") == ("other", "timed out")


def test_a_case_that_cannot_be_set_up_is_recorded_not_fatal(tmp_path):
    def setup(run, scratch):
        raise FileNotFoundError("no manifests in this tree's runs")

    record = bad_inputs_sweep.run_case(_case(setup=setup, copy=False), "/tree", None, str(tmp_path), 10)
    assert record["outcome"] == "other" and "set-up failed" in record["why"]
    assert not (tmp_path / "cases" / "c").exists()


def test_the_table_counts_every_label_by_class(tmp_path):
    records = [
        {"id": "a", "class": "nonsense flags", "outcome": "ok"},
        {"id": "b", "class": "nonsense flags", "outcome": "accepted silently"},
    ]
    (tmp_path / "bad_inputs_sweep_after.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    bad_inputs_sweep.tabulate(str(tmp_path))
    table = json.loads((tmp_path / "bad_inputs_sweep.json").read_text())["tables"]["after"]["nonsense flags"]
    assert table["ok"] == 1 and table["accepted silently"] == 1 and table["traceback"] == 0
    assert "| nonsense flags | 2 | 1 | 0 | 1 | 0 | 0 |" in (tmp_path / "bad_inputs_sweep.md").read_text()
