"""Attack success: the recovered criteria, Wilson intervals, Hungarian matching, the re-tabulation of
stored results (experiments.studies.success_rates) and the labelled grids (attacks.grids), on known inputs."""

import json
import os

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

from attacks import grids, metrics
from experiments import common
from experiments.studies import success_rates


def test_recovered_at_and_around_both_thresholds():
    ssim = {"aligned_ssim": [0.5999, 0.6, 0.6001, 1.0, np.nan, -0.2]}
    assert metrics.recovered(ssim, "ssim").tolist() == [False, True, True, True, False, False]
    psnr = {"aligned_psnr": [19.99, 20.0, 20.01, np.inf, np.nan, 5.0]}
    assert metrics.recovered(psnr, "psnr").tolist() == [False, True, True, True, False, False]
    with pytest.raises(ValueError, match="unknown success criterion"):
        metrics.recovered(ssim, "lpips")


def test_class_means_average_each_class_and_fall_back_to_the_overall_mean():
    images = np.stack([np.full((2, 2, 1), v, np.float32) for v in (0.0, 0.2, 1.0, 0.6)])
    means = metrics.class_means(images, np.array([0, 0, 2, 2]), 3)
    np.testing.assert_allclose(means[:, 0, 0, 0], [0.1, 0.45, 0.8])  # class 1 has no image: the overall mean


def test_wilson_interval_on_hand_computed_values():
    # Hand-computed with z = 1.95996: centre (p + z^2/2n) / (1 + z^2/n), half-width
    # z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    assert metrics.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert metrics.wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert metrics.wilson_interval(19, 30) == pytest.approx((0.45514, 0.78126), abs=1e-5)
    rate = metrics.success_rate([True] * 19 + [False] * 11)
    assert rate["n"] == 30 and rate["recovered"] == 19 and rate["rate"] == pytest.approx(19 / 30)
    assert (rate["low"], rate["high"]) == pytest.approx((0.45514, 0.78126), abs=1e-5)
    for successes, n in ((-1, 10), (11, 10), (0, 0)):
        with pytest.raises(ValueError):
            metrics.wilson_interval(successes, n)


def _distinct_images(count, size=16):
    """Images with different structure (so a matching by SSIM, which ignores brightness, can tell them apart)."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    patterns = [x, y, np.sin(6 * x) * 0.5 + 0.5, (x - 0.5) ** 2 + (y - 0.5) ** 2, np.cos(5 * y) * 0.5 + 0.5]
    return np.stack(patterns[:count])[..., None].astype(np.float32)


@pytest.mark.parametrize("by", metrics.MATCH_METRICS)
def test_hungarian_matching_recovers_a_known_permutation_and_its_scores(by):
    truth = _distinct_images(5)
    permutation = np.array([3, 0, 4, 1, 2])
    reconstructed = truth[permutation]  # reconstructed[i] is truth[permutation[i]]
    order, scores = metrics.match_and_score(reconstructed, truth, by=by)
    assert order.tolist() == np.argsort(permutation).tolist()
    np.testing.assert_array_equal(reconstructed[order], truth)
    np.testing.assert_allclose(scores["aligned_ssim"], 1.0, atol=1e-5)
    assert np.all(scores["aligned_psnr"] > 60)
    assert metrics.success_summary(scores)["ssim"]["recovered"] == 5


def test_matching_by_aligned_ssim_sees_through_brightness_and_contrast():
    truth = _distinct_images(4)
    permutation = np.array([2, 3, 1, 0])
    raw = 0.3 * truth[permutation] + 0.6  # the right structure, another contrast and brightness
    order, scores = metrics.match_and_score(np.clip(raw, 0, 1), truth, raw=raw, by="aligned_ssim")
    assert order.tolist() == np.argsort(permutation).tolist()
    np.testing.assert_allclose(scores["aligned_ssim"], 1.0, atol=1e-4)
    pairwise = metrics.pairwise_metrics(np.clip(raw, 0, 1), truth, raw)["aligned_ssim"]
    assert pairwise.shape == (4, 4) and np.all(pairwise[np.arange(4), permutation] > 0.99)
    with pytest.raises(ValueError, match="cannot match 3 reconstructions"):
        metrics.match_order(truth[:3], truth)
    with pytest.raises(ValueError, match="unknown matching metric"):
        metrics.match_order(truth, truth, by="lpips")


SETTINGS = {
    "model": "lenet",
    "dataset": "fashion_mnist",
    "num_images": 3,
    "offset": 0,
    "true_labels": [1, 2, 3],
    "batch_size": 1,
    "threats": ["none", "adaptive"],
    "options": {},
    "total_seconds": 1.0,
}


def _attack_file(directory, name, attack, seed, per_threat, **settings):
    doc = {
        "benchmark": name,
        "command": "python -m experiments.studies.attack_quality",
        "results": {
            threat: {"per_image": {"aligned_ssim": ssim, "aligned_psnr": psnr}, "summary": {}}
            for threat, (ssim, psnr) in per_threat.items()
        },
        "settings": dict(SETTINGS, attack=attack, seed=seed, **settings),
    }
    with open(os.path.join(directory, f"{name}.json"), "w") as f:
        json.dump(doc, f)


@pytest.fixture
def results_dir(tmp_path):
    _attack_file(
        tmp_path,
        "attacks_ig_fm",
        "ig",
        0,
        {"none": ([0.9, 0.6, 0.59], [25, 20, 19.99]), "adaptive": ([0.1, 0.2, 0.7], [10, 11, 21])},
    )
    _attack_file(
        tmp_path,
        "attacks_ig_fm_seed1",
        "ig",
        1,
        {"none": ([0.61, 0.3, 0.95], [20.5, 12, 30]), "adaptive": ([0.0, 0.65, 0.1], [9, 20, 8])},
    )
    _attack_file(
        tmp_path,
        "attacks_dlg_fm",
        "dlg",
        0,
        {"none": ([1, 1, 1], [70, 70, 70]), "adaptive": ([0.8, 0.1, 0.1], [22, 5, 5])},
    )
    _attack_file(
        tmp_path,
        "attacks_dlg_fm_seed1",
        "dlg",
        1,
        {"none": ([1, 1, 1], [70, 70, 70]), "adaptive": ([0.1, 0.1, 0.9], [5, 5, 25])},
    )
    _attack_file(tmp_path, "attacks_grnn_other", "grnn", 0, {"none": ([0.9, 0.9, 0.9], [30, 30, 30])})
    _attack_file(
        tmp_path, "attacks_grnn_other_seed1", "grnn", 1, {"none": ([0.1, 0.1, 0.1], [5, 5, 5])}, model="resnet20"
    )
    with open(tmp_path / "attacks_capture.json", "w") as f:  # a script's file: 'capture/threat' keys, no settings
        json.dump(
            {
                "command": "python -m tff_programs.attack",
                "results": {"c.npz/none": {"per_image": {"aligned_ssim": [0.7, 0.1], "aligned_psnr": [21, 9]}}},
            },
            f,
        )
    with open(tmp_path / "table6.json", "w") as f:
        json.dump({"benchmark": "table6", "results": {}}, f)
    attacks = {"ig/adaptive": [0.7, 0.1], "grnn/adaptive": [0.2, 0.65], "grnn/oracle": [0.9, 0.9]}
    with open(tmp_path / "privacy_utility.json", "w") as f:
        json.dump(
            {
                "benchmark": "privacy_utility",
                "results": {
                    "defences": {
                        "fedkl": {
                            "privacy": {
                                "sent": {
                                    "attacks": {
                                        name: {"per_image": {"aligned_ssim": ssim, "aligned_psnr": [15, 15]}}
                                        for name, ssim in attacks.items()
                                    }
                                }
                            }
                        }
                    }
                },
            },
            f,
        )
    return str(tmp_path)


def test_tabulation_pools_seed_files_and_labels_the_upper_bound(results_dir):
    payload = common.validate_payload("success_rates", success_rates.tabulate(results_dir))
    by_setting, by_file = payload["results"]["by_setting"], payload["results"]["by_file"]
    none = by_setting["ig_fm"]["none"]
    assert none["n"] == 6 and none["seeds"] == [0, 1]
    assert none["ssim"]["recovered"] == 4 and none["psnr"]["recovered"] == 4
    assert (none["ssim"]["low"], none["ssim"]["high"]) == pytest.approx(metrics.wilson_interval(4, 6))
    assert none["aligned_ssim"]["mean"] == pytest.approx(np.mean([0.9, 0.6, 0.59, 0.61, 0.3, 0.95]))
    assert by_setting["ig_fm"]["adaptive"]["ssim"]["recovered"] == 2
    assert by_file["attacks_ig_fm_seed1"]["none"]["n"] == 3
    assert by_file["attacks_ig_fm_seed1"]["none"]["ssim"]["recovered"] == 2
    # Files that differ in more than the seed stay apart, with a note.
    assert by_setting["grnn_other"]["none"]["n"] == 3 and by_setting["grnn_other_seed1"]["none"]["n"] == 3
    assert any("grnn_other" in note and "not pooled" in note for note in payload["notes"])
    assert by_setting["capture"]["none"]["n"] == 2 and by_setting["capture"]["none"]["ssim"]["recovered"] == 1
    assert "table6" not in by_file
    # Best of ig and dlg per image (same victims, images and seeds): seed 0 max SSIM (0.8, 0.2, 0.7), seed 1
    # (0.1, 0.65, 0.9).
    bound = payload["results"]["upper_bound"]["fm"]["adaptive"]
    assert bound["attacks"] == ["dlg", "ig"] and bound["n"] == 6 and bound["ssim"]["recovered"] == 4
    assert bound["aligned_ssim"]["mean"] == pytest.approx(np.mean([0.8, 0.2, 0.7, 0.1, 0.65, 0.9]))
    # privacy_utility.json: per attack/threat, and the best per image of those without the key (not the oracle).
    privacy = payload["results"]["privacy_utility"]["fedkl"]["sent"]
    assert privacy["ig/adaptive"]["ssim"]["recovered"] == 1 and privacy["grnn/oracle"]["ssim"]["recovered"] == 2
    assert privacy["upper_bound"]["ssim"]["recovered"] == 2
    assert privacy["upper_bound"]["aligned_ssim"]["mean"] == pytest.approx(np.mean([0.7, 0.65]))
    titles = [table["title"] for table in payload["tables"]]
    assert success_rates.UPPER_BOUND in " ".join(titles)
    bound_rows = payload["tables"][titles.index(success_rates.UPPER_BOUND + ", seeds pooled")]["rows"]
    assert bound_rows and all(row[0].startswith("upper bound: ") for row in bound_rows)
    setting_rows = payload["tables"][0]["rows"]
    assert ["ig_fm", "adaptive", "0, 1", 6, "2/6 = 33 %"] == setting_rows[
        [r[:2] for r in setting_rows].index(["ig_fm", "adaptive"])
    ][:5]


def test_the_label_floor_scores_class_means_of_the_attacked_images_only(results_dir, monkeypatch):
    from attacks import study
    from tfkl import data

    rng = np.random.default_rng(0)
    fake = data.Dataset(
        "fashion_mnist",
        rng.integers(0, 256, (5, 28, 28, 1)).astype(np.uint8),
        np.array([1, 2, 3, 3, 1]),  # the files' true labels [1, 2, 3] first
        rng.integers(0, 256, (30, 28, 28, 1)).astype(np.uint8),
        np.arange(30) % 10,
        10,
    )
    monkeypatch.setattr(study, "load_data", lambda name, data_dir=None: fake)
    payload = success_rates.tabulate(results_dir)
    floor = payload["results"]["label_floor"]["ig_fm"]
    input_shape, images, labels = study.training_images(fake, "lenet", 3)
    expected = study.label_floor(study.test_class_means(fake, input_shape), images, labels)["aligned_ssim"]
    assert floor["n"] == 6 and floor["seeds"] == [0, 1]  # the same 3 images under both seed files
    assert floor["aligned_ssim"]["mean"] == pytest.approx(float(np.mean(expected)))
    rows = payload["tables"][0]["rows"]
    assert [r[:2] for r in rows[:3]] == [["capture", "none"], ["dlg_fm", success_rates.LABEL_FLOOR], ["dlg_fm", "none"]]
    fake = fake._replace(y_train=np.array([4, 4, 4, 4, 4]))  # not the images the files name: no floor, a note
    payload = success_rates.tabulate(results_dir)
    assert payload["results"]["label_floor"] == {} and any("not scored" in n for n in payload["notes"])


def test_binary_writes_the_envelope_and_markdown(results_dir):
    try:
        flags.FLAGS(["success_rates", f"--results_dir={results_dir}"])
        success_rates.main(["success_rates"])
    finally:
        flags.FLAGS.unparse_flags()
    with open(os.path.join(results_dir, "success_rates.json")) as f:
        doc = json.load(f)
    assert doc["benchmark"] == "success_rates" and doc["git_commit"] and doc["command"]
    assert doc["results"]["by_setting"]["ig_fm"]["none"]["ssim"]["recovered"] == 4
    with open(os.path.join(results_dir, "success_rates.md")) as f:
        markdown = f.read()
    assert "| ig_fm | none | 0, 1 | 6 | 4/6 = 67 % |" in markdown and success_rates.UPPER_BOUND in markdown


def test_labelled_grid_writes_a_png_of_the_expected_size(tmp_path):
    truth = _distinct_images(3, size=8)
    rows = [
        ("none", truth, None),
        ("adaptive", np.clip(truth + 0.1, 0, 1), {"aligned_psnr": [21.0, 15.0, 9.0], "aligned_ssim": [0.7, 0.5, 0.1]}),
    ]
    path = grids.save_labelled_grid(str(tmp_path / "grid.png"), truth, rows, truth_labels=[1, 2, 3], scale=4)
    png = tf.io.decode_png(tf.io.read_file(path)).numpy()
    # 3 rows of (8 * 4 + 28 caption + 6 pad) pixels, 6 top pad, 20 footer; 110 label + 3 * (8 * 4 + 6) + 6 wide.
    assert png.shape[:2] == (6 + 3 * 66 + 20, 110 + 3 * 38 + 6) == grids.grid_shape(3, 3, 8, 8, 4)
    assert png[..., :3].min() < 50 and png[..., :3].max() > 200  # images and text drawn on white
    with pytest.raises(ValueError, match="has 2 images for 3 true images"):
        grids.save_labelled_grid(str(tmp_path / "bad.png"), truth, [("none", truth[:2], None)])
