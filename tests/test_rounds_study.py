"""The rounds study (regime M): its training runs, what the server sees under DP-FedAvg, resume and tabulation."""

import json
import os

import numpy as np
import pytest

from attacks import base, cases, pooled, targets
from experiments import cells
from experiments.report import figures
from experiments.studies import rounds
from tfkl import capture as capture_lib


def _record(out, regime, row, attack, seed, client, count, ssims):
    cell = rounds.cell_of(regime, row, seed, attack)
    per_image = {"aligned_ssim": list(ssims), "ssim": list(ssims), "aligned_psnr": [30.0] * len(ssims)}
    record = dict(attack=attack, client=client, seed=seed, count=count, per_image=per_image, seconds=2.0)
    rounds.store(out).write(cell, rounds.unit(client, count), record)


def test_the_training_run_captures_every_round_without_persistent_momentum():
    argv = rounds.train_argv("M1", "spatial", 2, "/r", 8)
    assert argv[0] == "tff_programs.train"
    for flag in ("--rounds=8", "--capture_rounds=all", "--persist_optimizer_state=false", "--seed=2"):
        assert flag in argv
    assert {"--examples_per_client=1", "--fresh_examples", "--lock_affine=spatial"} <= set(argv)
    assert "--client_weighting=uniform" in rounds.train_argv("M8", "dp-3", 0, "/r", 4)


def test_the_noise_and_pruning_rows_train_their_protocol_and_the_attacker_knows_pruning():
    assert "--lock_noise=0.5" in rounds.train_argv("M1", "compact-noise", 0, "/r", 8)
    assert {"--prune_fraction=0.9", "--lock_kernel=compact"} <= set(
        rounds.train_argv("M1", "compact-pruned", 0, "/r", 8)
    )
    member = targets.Target("update", (np.ones(3, np.float32),), 1, batch_size=1, learning_rate=0.01)
    pool = targets.Pooled((member, member), ((), ()))
    assert all(m.pruned for m in rounds.with_protocol(pool, "compact-pruned").members)
    assert rounds.with_protocol(pool, "compact-noise") is pool


def test_under_dp_fedavg_the_server_sees_each_update_clipped_and_without_noise():
    update = [np.full((3,), 1.0, np.float32), np.full((4,), 9.0, np.float32)]
    meta = {"trainable": [True, False]}
    capture = capture_lib.Capture(meta, [np.zeros(3), np.zeros(4)], update)
    assert rounds.server_sees(capture, "spatial") is capture
    clipped = rounds.server_sees(capture, "dp-1")
    np.testing.assert_allclose(np.linalg.norm(clipped.update[0]), rounds.DP_CLIP, rtol=1e-6)  # trainable norm
    np.testing.assert_allclose(clipped.update[1] / update[1], clipped.update[0][0] / update[0][0])  # one scale
    small = capture._replace(update=[u * 0.01 for u in update])
    np.testing.assert_array_equal(rounds.server_sees(small, "dp-3").update[0], small.update[0])


def test_more_noise_and_fewer_rounds_give_a_smaller_epsilon():
    assert rounds.epsilon(3.0, 8) < rounds.epsilon(1.0, 8) < rounds.epsilon(1.0, 16)
    assert rounds.epsilon(1.0, 8) == pytest.approx(16.5, rel=0.01)


def test_a_cell_is_done_only_when_every_attack_has_every_unit(tmp_path):
    dirs = (str(tmp_path / "runs"), str(tmp_path / "records"))
    (job,) = rounds.cell_jobs(dirs, ["M1"], ["paper"], [0], ["grnn", "ig"], [1, 2], [0.0])
    assert "--rounds_cell=M1/paper/0" in job.command and "--rounds_attacks=grnn,ig" in job.command
    for attack in ("grnn", "ig"):
        for client in rounds.WATCHED:
            for count in (1, 2):
                assert not job.done()
                _record(dirs[1], "M1", "paper", attack, 0, client, count, [0.2] * count)
    assert job.done()


def test_the_repeated_images_attack_runs_only_where_the_client_keeps_its_images(tmp_path):
    assert rounds.repeats_images("M8") and not rounds.repeats_images("M1")
    assert rounds.regime_attacks("M1", ["ig", "ig-repeated"]) == ["ig"]
    assert rounds.regime_attacks("M8", ["ig", "ig-repeated"]) == ["ig", "ig-repeated"]
    dirs = (str(tmp_path / "runs"), str(tmp_path / "records"))
    jobs = rounds.cell_jobs(dirs, ["M1", "M8"], ["compact"], [0], ["ig-repeated"], [1, 8], [0.0])
    assert [job.name for job in jobs] == ["M8-compact/seed0"]
    for client in rounds.WATCHED:
        for count in (1, 8):
            assert not jobs[0].done()
            _record(dirs[1], "M8", "compact", "ig-repeated", 0, client, count, [0.2] * 8)
    assert jobs[0].done() and set(rounds.stored(dirs[1])) == {("M8", "compact", "ig-repeated")}


def test_tabulation_pools_every_image_of_every_watched_client_and_seed(tmp_path):
    out = str(tmp_path)
    for seed in (0, 1):
        _record(out, "M1", "spatial", "grnn", seed, 0, 1, [0.7])
        _record(out, "M1", "spatial", "grnn", seed, 1, 1, [0.1])
        _record(out, "M1", "spatial", "grnn", seed, 0, 2, [0.7, 0.65])
    _record(out, "M1", "dp-1", "ig", 0, 0, 2, [0.9, 0.2])
    payload = rounds.tabulate(out)
    one, two = payload["results"]["M1"]["spatial"]["grnn"]["1"], payload["results"]["M1"]["spatial"]["grnn"]["2"]
    assert (one["recovered"], one["n"], two["recovered"], two["n"]) == (2, 4, 4, 4)
    assert one["seeds"] == [0, 1] and one["mean_ssim"] == pytest.approx(0.4)
    (spatial,) = [row for row in payload["tables"][0]["rows"] if row[1] == rounds.ROWS["spatial"][0]]
    # A K that holds less than its row says what it holds: here client 0 alone at K = 2.
    pooled_two = "4/4 = 100 % [51, 100] % (seed 0 client 0 only; seed 1 client 0 only)"
    assert spatial[2:] == ["grnn, adaptive", "0, 1", "2/4 = 50 % [15, 85] %", pooled_two, "2 s at K = 2"]
    (dp,) = [row for row in payload["tables"][0]["rows"] if row[1].startswith("DP-FedAvg")]
    assert "epsilon" in dp[1] and dp[4] == "not run" and dp[5].startswith("1/2") and dp[6] == "2 s at K = 2"
    assert rounds.coverage([dict(seed=0, client=0), dict(seed=0, client=1)], [0, 1]) == " (seed 0)"
    assert rounds.coverage([dict(seed=s, client=c) for s in (0, 1) for c in rounds.WATCHED], [0, 1]) == ""
    record = rounds.store(out).read(rounds.cell_of("M1", "dp-1", 0, "ig"), rounds.unit(0, 2))
    rounds.store(out).write(rounds.cell_of("M1", "dp-1", 0, "ig"), rounds.unit(0, 2), dict(record, peak_rss_gb=1.26))
    (dp,) = [row for row in rounds.tabulate(out)["tables"][0]["rows"] if row[1].startswith("DP-FedAvg")]
    assert dp[6] == "2 s at K = 2, 1.3 GB"
    path, page = cells.publish("rounds", payload, 1.0, out, results_dir=str(tmp_path / "results"))
    assert json.load(open(path))["results"]["M1"]["dp-1"]["ig"]["2"]["n"] == 2 and os.path.exists(page)
    figures.pooled_rounds(json.load(open(path)), str(tmp_path / "pooled.png"))
    assert (tmp_path / "pooled.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_captures_are_named():
    with pytest.raises(FileNotFoundError, match="round_00001_client_0.npz"):
        rounds.watched_captures("/nonexistent", 0, 2)


def test_a_grid_shows_client_0s_largest_pool_each_capture_matched_to_its_own_images(tmp_path):
    runs, records = str(tmp_path / "runs"), str(tmp_path / "records")
    rng = np.random.default_rng(0)
    truth = rng.uniform(size=(4, 8, 8, 1)).astype(np.float32)  # 2 captures of 2 images
    swapped = truth[[1, 0, 3, 2]]  # each capture's images in the other order
    labels = np.arange(4)
    root = rounds.run_root(runs, "M1", "paper", 0)
    for count in (1, 2):
        n = 2 * count
        rebuilt = base.Reconstruction(swapped[:n], swapped[:n], labels[[1, 0, 3, 2]][:n], 0.0, [], {})
        truths = [cases.UserData(truth[k : k + 2], labels[k : k + 2]) for k in range(0, n, 2)]
        _, order = pooled.score(rebuilt, truths)
        path = rounds.reconstruction_path(root, "ig", rounds.unit(0, count))
        rounds.save_reconstruction(path, rebuilt, order, truths)
        _record(records, "M1", "paper", "ig", 0, 0, count, [0.9] * 2 * count)
    _record(records, "M1", "paper", "ig", 0, 1, 2, [0.9] * 4)  # client 1: no reconstruction, no grid
    with np.load(rounds.reconstruction_path(root, "ig", rounds.unit(0, 2))) as saved:
        np.testing.assert_array_equal(saved["reconstruction"], truth)
    lines = []
    (grid,) = rounds.draw_grids(runs, records, lines.append)
    assert grid == os.path.join(os.path.dirname(root), "grid_ig_client0.png") and lines == [f"grid: {grid}"]
    assert open(grid, "rb").read(4) == b"\x89PNG"


def test_the_report_takes_seed_0s_grid_of_each_row_and_attack(tmp_path):
    source, figures_dir = tmp_path / "rounds", tmp_path / "figures"
    (source / "M8-compact" / "seed0").mkdir(parents=True)
    (source / "M8-compact" / "seed0" / "grid_ig_client0.png").write_bytes(b"\x89PNG")
    figures_dir.mkdir()
    docs = {"rounds": {"results": {"M8": {"compact": {"ig": {}, "grnn": {}}, "none": {"ig": {}}}}}}
    written = figures.rounds_grids(docs, str(figures_dir), str(source))
    assert written == [str(figures_dir / "grid_rounds_M8-compact_ig.png")]
    assert open(written[0], "rb").read() == b"\x89PNG"
