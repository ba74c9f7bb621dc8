"""The frontier study: which attack counts as the worst, the ship target, and where each figure comes from."""

import json
import os

import pytest

from experiments.studies import frontier, rounds


def _success(recovered, n, low, high):
    return {"recovered": recovered, "n": n, "rate": recovered / n, "low": low, "high": high}


def _sources():
    zero = {"ssim": _success(0, 30, 0.0, 0.11)}
    candidates = {
        "control": 0.85,
        "by_configuration": {
            "spatial": {
                "success": {"grnn": zero, "ig": zero},
                "lenet_minus_control": -0.025,
                "lenet_seeds": 3,
                "random_key": 0.81,
                "step_time_ratio": 3.8,
            },
            "none": {"success": {"grnn": {"ssim": _success(30, 30, 0.89, 1.0)}}},
        },
    }
    pooled_rows = {
        "M1": {
            "spatial": {"ig": {"1": _success(0, 6, 0.0, 0.39), "16": _success(39, 96, 0.31, 0.51)}},
            "compact-noise": {"ig": {"1": _success(0, 40, 0.0, 0.09), "8": _success(0, 40, 0.0, 0.09)}},
        },
        "M8": {"compact-noise": {"ig": {"8": _success(0, 40, 0.0, 0.09)}}},
    }
    lock_cost = {"lenet": {"clocks": {"cpu": {"ratio_to_control": {"compact": {"median": 1.05}}}}}}
    return candidates, pooled_rows, lock_cost


def test_the_worst_attack_is_the_surest_leak_and_among_zeros_the_most_images():
    small_sure = ("a", _success(2, 2, 0.34, 1.0))
    large = ("b", _success(29, 30, 0.83, 0.99))
    assert frontier.worst([small_sure, large]) == large
    zeros = [("c", _success(0, 6, 1e-17, 0.39)), ("d", _success(0, 48, 7e-18, 0.07))]
    assert frontier.worst(zeros)[0] == "d"
    assert frontier.worst([]) is None


def test_each_figure_comes_from_its_source_and_the_pooled_attack_decides(tmp_path):
    row = frontier.row_of("spatial", frontier.CONFIGS["spatial"], _sources(), str(tmp_path))
    assert row["worst_single"][0] == "GRNN, batch 1" and row["worst_pooled"][0] == "IG, M1 K = 16"
    assert (row["accuracy_minus_control"], row["random_key"], row["step_ratio"]) == (-0.025, 0.81, 3.8)
    assert not row["meets_target"]
    compact = frontier.row_of("compact", frontier.CONFIGS["compact"], _sources(), str(tmp_path))
    assert compact["step_ratio"] == 1.05 and compact["accuracy_minus_control"] == -0.025  # the full form's


def test_a_configuration_meets_the_target_only_with_every_figure_measured_and_within_it(tmp_path):
    name, sources = "compact-noise", _sources()
    row = frontier.row_of(name, frontier.CONFIGS[name], sources, str(tmp_path))
    assert row["accuracy_minus_control"] is None and not row["meets_target"]  # accuracy not measured
    for seed, own in ((0, 0.845), (1, 0.843)):
        path = frontier.record_path(str(tmp_path), name, seed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"own": own, "random_key": 0.15}, f)
    row = frontier.row_of(name, frontier.CONFIGS[name], sources, str(tmp_path))
    assert row["accuracy_minus_control"] == pytest.approx(-0.006) and row["accuracy_seeds"] == 2
    assert row["meets_target"]
    assert [where for where, _ in frontier.pooled_captures(frontier.CONFIGS[name], sources[1])] == [
        "IG, M1 K = 8",
        "IG, M8 K = 8",
    ]
    assert not frontier.meets_target([("x", _success(0, 10, 0.0, 0.28))], [("y", _success(0, 40, 0.0, 0.09))], 0, None)
    assert not frontier.meets_target([("x", _success(0, 40, 0.0, 0.09))], [("y", _success(0, 40, 0.0, 0.09))], 0, 0.3)


def test_dp_rows_report_the_epsilon_of_the_accuracy_runs(tmp_path):
    row = frontier.row_of("dp-3", frontier.CONFIGS["dp-3"], _sources(), str(tmp_path))
    assert row["epsilon"] == pytest.approx(rounds.epsilon(3.0, frontier.ACCURACY_ROUNDS))
    assert row["step_ratio"] == 1.0 and row["worst_single"] is None
