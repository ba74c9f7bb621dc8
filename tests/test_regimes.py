"""The realistic-regime benchmark's parts: label hypotheses, restart choice, and resumable per-client cells."""

import dataclasses
import json
import os
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from attacks import cases, experiment, labels, targets
from attacks import model as model_lib
from experiments import cells, common
from experiments.studies import regimes
from experiments.studies.regimes import run as regimes_run
from experiments.studies.regimes import table as regimes_table
from tests.helpers import write_idx
from tfkl import data, models


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """Fashion-MNIST's files, generated: scikit-learn's digits upscaled to 28x28 (structured images)."""
    directory = tmp_path_factory.mktemp("fashion")
    digits = data.load("digits")
    small = np.concatenate([digits.x_train[:40], digits.x_test[:10]])[..., 0]
    images = tf.image.resize(small[..., None], (28, 28)).numpy()[..., 0] * 255
    names = data._FASHION_FILES
    arrays = (images[:40], digits.y_train[:40], images[40:], digits.y_test[:10])
    for name, array in zip(names, arrays):
        write_idx(directory / name, np.clip(array, 0, 255))
    return str(directory)


def test_label_hypotheses_put_the_count_rule_first_then_its_nearest_alternatives(monkeypatch):
    # Signals of 4 examples, true counts {0: 2, 1: 1, 2: 1}, with noise that makes the rule count {0: 1, 1: 2, 2: 1}.
    signal = np.full(10, 0.1)
    signal[:3] = 0.1 - np.array([2, 1, 1]) / 4 + np.array([0.14, -0.14, 0.0])
    monkeypatch.setattr(labels, "last_layer_signal", lambda attacker, target: signal)
    target = targets.Target("gradient", (), 4, 4)
    hypotheses = labels.label_hypotheses(None, target, 4)
    np.testing.assert_array_equal(hypotheses[0], labels.infer_labels(None, target))
    np.testing.assert_array_equal(hypotheses[0], [0, 1, 1, 2])
    assert len({tuple(h) for h in hypotheses}) == 4 and all(len(h) == 4 for h in hypotheses)
    assert [0, 0, 1, 2] in [list(h) for h in hypotheses[1:3]]  # one example moved: the truth is a near alternative
    assert len(labels.label_hypotheses(None, target, 1)) == 1


def test_each_restart_tries_a_label_hypothesis_and_the_lowest_loss_wins():
    victim = models.build("lenet", (16, 16, 1), 10, lock=False, init="pytorch", seed=0)
    rng = np.random.default_rng(0)
    images, true = rng.uniform(size=(3, 16, 16, 1)).astype(np.float32), np.array([4, 4, 7])
    payload, _ = cases.simulate_clients(victim, images, true, 3)
    attacker = model_lib.AttackerModel(payload.view, "none")
    attack = experiment.build_attack("idlg", attacker, iterations=20, restarts=3, label_hypotheses=3)
    (rec,) = attack.reconstruct(list(payload.targets))
    hypotheses = labels.label_hypotheses(attacker, payload.targets[0], 3)
    best = int(np.argmin(rec.info["restart_losses"]))
    assert rec.info["best_restart"] == best
    np.testing.assert_array_equal(rec.labels, hypotheses[best])
    assert len({tuple(h) for h in hypotheses}) == 3


TINY = dataclasses.replace(
    regimes.REGIMES["U8"],
    images_per_client=4,
    clients=2,
    batch_size=2,
    iterations=2,
    restarts=1,
)


@pytest.mark.parametrize("threat", ["none", regimes.ORDER_ORACLE, "adaptive-key-private"])
def test_a_cell_stores_each_client_and_a_rerun_attacks_only_what_is_missing(threat, fashion_dir, tmp_path):
    out, lines = _store(tmp_path), []
    regimes_run.run_cell(TINY, 0, threat, out, fashion_dir, log=lines.append)
    paths = [regimes.client_path(out, "U8", 0, threat, c) for c in range(2)]
    assert all(p.startswith(out.records) for p in paths)  # the records apart from the rest: kept in the repository
    assert sorted(os.listdir(os.path.dirname(paths[0]))) == ["client_00.json", "client_01.json"]
    results = [json.load(open(p)) for p in paths]
    assert [r["client"] for r in results] == [0, 1] and all(len(r["per_image"]["aligned_ssim"]) == 4 for r in results)
    assert all(len(r["recovered_labels"]) == 4 and r["iterations"] == 2 for r in results)
    counted = [r["count_rule_labels"] for r in results]  # the counting rule alone, under 'none' only
    assert all(len(c) == 4 for c in counted) if threat == "none" else counted == [None, None]
    assert np.load(regimes.reconstruction_path(out, "U8", 0, threat, 1)).shape == (4, 32, 32, 1)
    before = [os.stat(p).st_mtime_ns for p in paths]
    lines.clear()
    regimes_run.run_cell(TINY, 0, threat, out, fashion_dir, log=lines.append)
    assert lines == [] and [os.stat(p).st_mtime_ns for p in paths] == before  # nothing to do
    os.remove(paths[1])  # as if killed while attacking client 1
    regimes_run.run_cell(TINY, 0, threat, out, fashion_dir, log=lines.append)
    assert os.stat(paths[0]).st_mtime_ns == before[0] and os.path.exists(paths[1])
    assert any("client 1:" in line for line in lines) and not any("client 0:" in line for line in lines)


def test_regimes_of_one_case_share_the_step_search_and_get_its_labels(fashion_dir, tmp_path, monkeypatch):
    searched, search = [], labels.step_assignments

    def counted(attacker, target, count, **kwargs):
        searched.append(target)
        return search(attacker, target, count, **kwargs)

    monkeypatch.setattr(labels, "step_assignments", counted)
    grnn = dataclasses.replace(TINY, name="U8-GRNN", attack="grnn")
    monkeypatch.setattr(regimes_run, "REGIMES", {"U8": TINY, "U8-GRNN": grnn})
    assert TINY.case == grnn.case != dataclasses.replace(TINY, batch_size=4).case
    shared, alone = _store(tmp_path / "shared"), _store(tmp_path / "alone")
    from_records = regimes.Store(shared.records, str(tmp_path / "other_work"))

    def run(regime, out):
        regimes_run.run_cell(regime, 0, "oracle", out, fashion_dir, log=lambda line: None)
        return [json.load(open(regimes.client_path(out, regime.name, 0, "oracle", c)))["step_labels"] for c in (0, 1)]

    first = run(TINY, shared)
    assert len(searched) == 2  # one search per client
    assert run(grnn, from_records) == first and len(searched) == 2  # taken from the other regime's records
    assert run(grnn, alone) == first and len(searched) == 4  # searched again where nothing is stored: the same
    for c in (0, 1):
        os.remove(regimes.client_path(alone, "U8-GRNN", 0, "oracle", c))
    assert run(grnn, alone) == first and len(searched) == 4  # a killed cell's search is kept under its work dir
    with pytest.raises(ValueError, match="label_hypotheses=1"):
        dataclasses.replace(TINY, label_hypotheses=2)


def test_a_prior_cell_trains_its_decoder_once_on_the_test_split_and_attacks_through_it(
    fashion_dir, tmp_path, monkeypatch
):
    from attacks import prior

    trained, train_decoder = [], prior.train_decoder
    test_images = len(data.load("fashion_mnist", fashion_dir).x_test)

    def quick(images, latent_dim, **_):
        trained.append(len(images))
        return train_decoder(images[:64], latent_dim, epochs=1, log=lambda line: None)

    settings = []

    class Recorded(prior.GenerativePrior):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            settings.append((self.config.distance, self.config.latent_iterations))

    monkeypatch.setattr(prior, "train_decoder", quick)
    monkeypatch.setattr(prior, "GenerativePrior", Recorded)
    regime = dataclasses.replace(TINY, name="U16-prior", attack="prior", distance="cosine", latent_iterations=2)
    out = _store(tmp_path)
    for threat in ("none", "oracle"):
        regimes_run.run_cell(regime, 0, threat, out, fashion_dir, log=lambda line: None)
    assert trained == [test_images]  # once, on the split no client trains on; the second cell loads it
    assert settings == [("cosine", 2), ("cosine", 2)]  # the regime's, not the attack's defaults
    record = json.load(open(regimes.client_path(out, "U16-prior", 0, "oracle", 1)))
    assert record["iterations"] == 2 and len(record["per_image"]["aligned_ssim"]) == 4


def test_only_a_prior_regime_takes_a_latent_stage():
    with pytest.raises(ValueError, match="G8: latent_iterations applies to the prior attack only"):
        dataclasses.replace(regimes.REGIMES["G8"], latent_iterations=100)


def _store(tmp_path):
    return regimes.Store(str(tmp_path / "records"), str(tmp_path / "work"))


def test_tabulate_leads_with_success_rates_and_draws_a_labelled_grid(fashion_dir, tmp_path, monkeypatch):
    out = _store(tmp_path)
    for threat in ("none", "oracle"):
        regimes_run.run_cell(TINY, 0, threat, out, fashion_dir, log=lambda line: None)
    payload = regimes_table.tabulate(
        out, [TINY], [0, 1], ("none", "oracle", "adaptive"), fashion_dir, log=lambda line: None
    )
    common.validate_payload("regimes", payload)
    compact, beyond, detailed, cost, counts, sizes, curves = payload["tables"]
    assert [row[:2] for row in cost["rows"]] == [  # the threats asked for
        ["U8", "2/6"],
        ["all regimes: none", "1/2"],
        ["all regimes: oracle", "1/2"],
        ["all regimes: adaptive", "0/2"],
        ["all regimes, all threats", "2/6"],
    ]
    assert cost["rows"][-1][2:] == cost["rows"][0][2:]  # one regime: its cells are all the cells
    assert cost["rows"][3][2] == 0 and cost["rows"][3][5] is not None  # adaptive projected at U8's mean
    assert cost["rows"][1][4].endswith(" %") and cost["rows"][3][4] is None  # the optimiser's share of what ran
    assert counts["rows"] == [["U8", 2, counts["rows"][0][2], counts["rows"][0][3]]]
    (size,) = sizes["rows"]  # 4 images of 32 x 32 against LeNet's 15,226 weights
    assert size == ["U8", 4096, 15226, 0.27]
    assert compact["columns"] == ["regime", "client", regimes.LABEL_FLOOR, "none", "oracle"]
    assert compact["rows"][0][:2] == ["U8", TINY.description] and compact["rows"][0][2].endswith("/8)")
    floor = payload["results"]["U8"]["label_floor"]  # seed 0's 8 images as their class means
    assert floor["n"] == 8 and floor["seeds"] == [0] and 0 < floor["aligned_ssim"]["mean"] < 1
    assert beyond["columns"] == ["regime", "none", "oracle"] and beyond["rows"][0][0] == "U8"
    success = payload["results"]["U8"]["none"]["success"]
    assert success["beyond_floor"]["n"] == 8 and success["beyond_floor"]["recovered"] <= success["ssim"]["recovered"]
    assert [row[:4] for row in detailed["rows"]] == [["U8", "none", "0", 8], ["U8", "oracle", "0", 8]]
    assert detailed["columns"][4] == "recovered: aligned SSIM >= 0.6" and len(curves["rows"]) == 2
    summary = payload["results"]["U8"]["none"]
    assert summary["n"] == 8 and summary["success"]["ssim"]["n"] == 8 and 0 <= summary["success"]["ssim"]["low"]
    assert os.path.exists(os.path.join(out.work, "U8", "grid_seed0.png"))
    assert not os.path.exists(os.path.join(out.work, "U8", "grid_seed1.png"))  # seed 1 has nothing stored
    # A fresh clone has the records alone (no training run, no update): the same tables, no grid.
    records_only = regimes.Store(out.records, str(tmp_path / "clone"))
    monkeypatch.setattr(regimes_run, "_victim", lambda *_: pytest.fail("tabulating rebuilt a victim"))
    lines = []
    again = regimes_table.tabulate(
        records_only, [TINY], [0, 1], ("none", "oracle", "adaptive"), fashion_dir, lines.append
    )
    assert again["tables"] == payload["tables"] and again["results"] == payload["results"]
    assert lines == [] and not os.path.exists(records_only.work)


def test_each_ablation_changes_one_setting_per_variant_off_the_tables_seeds(fashion_dir, tmp_path, monkeypatch):
    from experiments.studies import ablations

    for ablation in ablations.ABLATIONS.values():
        assert not set(ablation.seeds) & {0, 1, 2}  # victims outside the table's seeds
        configured = {v.name: v for v in ablation.variants if v.name in regimes.REGIMES}  # as the table runs them
        for name, variant in configured.items():
            table = regimes.REGIMES[name]
            assert dataclasses.replace(variant, clients=table.clients, description=table.description) == table
        for variant in ablation.variants:
            base = configured[max((n for n in configured if variant.name.startswith(n)), key=len)]
            changed = {k for k, v in dataclasses.asdict(variant).items() if v != dataclasses.asdict(base)[k]}
            assert len(changed - {"name", "description"}) <= 1
    r_variants = ablations.ABLATIONS["R-inference"].variants
    assert r_variants[0].training is False and r_variants[2].attack_options()["tv"] == 1e-3
    assert "tv" not in r_variants[4].attack_options()  # GRNN
    tiny = tuple(dataclasses.replace(v, model="lenet", clients=1, iterations=2) for v in r_variants[:2])
    monkeypatch.setattr(ablations, "ABLATIONS", {"R-inference": ablations.Ablation((0,), tiny)})
    out = _store(tmp_path)
    for variant in tiny:
        regimes_run.run_cell(variant, 0, "none", out, fashion_dir, log=lambda line: None)
    payload = ablations.tabulate(out, fashion_dir, log=lambda line: None)
    compact, per_victim, detailed, curves = payload["tables"]
    assert [row[0] for row in compact["rows"]] == [v.name for v in tiny]
    assert compact["columns"][2:] == [regimes.LABEL_FLOOR, "none"]
    assert compact["title"].startswith("R-inference: images recovered")
    assert per_victim["columns"] == ["variant", "victim 0"] and [row[0] for row in per_victim["rows"]] == [
        v.name for v in tiny
    ]
    assert len(detailed["rows"]) == 2 and payload["results"][tiny[1].name]["none"]["n"] == 1


def test_a_threat_facing_the_lock_runs_only_where_the_attack_recovers_images_without_it(tmp_path, monkeypatch):
    out, launched, lines = _store(tmp_path), [], []
    monkeypatch.setattr(cells, "launch", lambda job: launched.append(job.cell.threat) or 0)
    monkeypatch.setattr(regimes, "_floor_recovered", lambda regime, seeds, data_dir: 1)  # the labels alone: 1 image

    def store(threat, ssim):
        for client in range(TINY.clients):
            path = regimes.client_path(out, "U8", 0, threat, client)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(
                    dict(
                        client=client,
                        per_image=dict(aligned_ssim=[ssim, 0.1, 0.1, 0.1]),
                        seconds=60.0,
                        optimizer_seconds=15.0,
                    ),
                    f,
                )

    def run():
        launched.clear()
        lines.clear()
        regimes_run.run_cells([TINY], [0], ["none", "oracle", regimes.ORDER_ORACLE, "adaptive"], out, log=lines.append)
        lines[:] = [line for line in lines if "not run" in line]
        return launched  # the cells launched: those that would measure something and are not stored (resume)

    store("none", 0.59)  # below the threshold: nothing recovered, fewer than the labels alone
    assert run() == [regimes.ORDER_ORACLE]
    assert lines == [
        "== U8 oracle: not run, none recovers no more images than the labels alone",
        "== U8 adaptive: not run, none recovers no more images than the labels alone",
    ]
    assert regimes_table._missing_cell(TINY, "adaptive", out, [0]) == "not run: none does not beat the floor"
    assert regimes_table._missing_cell(TINY, "adaptive", out, [0, 1]) == "not run yet"  # seed 1 not stored
    assert regimes_table._missing_cell(regimes.REGIMES["G8"], regimes.ORDER_ORACLE, out, [0]) == "does not apply"
    assert regimes_table._cost_rows(out, [TINY], [0], ("none", "oracle", "adaptive"))[0] == [
        "U8",
        "1/1",
        2,
        2.0,
        "25 %",
        2,
    ]

    store("none", 0.6)  # 2 images recovered, 1 by the labels alone: 'oracle' runs, 'adaptive' until 'oracle' is known
    assert run() == ["oracle", regimes.ORDER_ORACLE, "adaptive"]
    store("oracle", 0.2)
    assert run() == [regimes.ORDER_ORACLE] and lines == [
        "== U8 adaptive: not run, oracle recovers no more images than the labels alone"
    ]
    store("adaptive", 0.2)  # stored cells are tabulated and counted whatever the rule says now
    assert [row[:2] for row in regimes_table._cost_rows(out, [TINY], [0], ("none", "oracle", "adaptive"))][0] == [
        "U8",
        "3/3",
    ]


def test_cells_run_parallel_at_a_time_and_a_failure_is_raised_once_the_others_are_done(tmp_path, monkeypatch):
    running, most, finished, lock = set(), [0], [], threading.Lock()

    def launch(job):
        key = (job.cell.regime, job.cell.seed, job.cell.threat)
        with lock:
            running.add(key)
            most[0] = max(most[0], len(running))
        time.sleep(0.2)
        with lock:
            running.discard(key)
            finished.append(key)
        assert job.command[1:3] == ["-m", "experiments.studies.regimes"] and job.log_path.endswith("log.txt")
        return 1 if key[:2] == ("U8", 0) else 0

    monkeypatch.setattr(cells, "launch", launch)
    other = dataclasses.replace(TINY, name="G8")
    with pytest.raises(RuntimeError, match=r"cell U8/0/none failed \(exit 1\); see .*U8/seed0/none/log.txt"):
        regimes_run.run_cells([TINY, other], [0, 1, 2], ["none"], _store(tmp_path), parallel=2, log=lambda line: None)
    assert most[0] == 2 and len(finished) == 6  # the others ran to their end


def test_a_cells_records_are_the_engines(tmp_path):
    out = _store(tmp_path)
    record = out.cells.write(regimes.cell(TINY, 0, "none"), 1, {"client": 1})
    assert (
        record == regimes.client_path(out, "U8", 0, "none", 1) == str(tmp_path / "records/U8/seed0/none/client_01.json")
    )
    assert regimes.pending_clients(out, TINY, 0, "none") == [0] and regimes.load_cell(out, TINY, 0, "none") == [
        {"client": 1}
    ]


def test_an_image_is_recovered_beyond_its_label_only_above_its_class_means_score(monkeypatch):
    floor = {0: [0.7, 0.2, 0.5, 0.9], 1: [0.1, 0.1, 0.1, 0.1]}  # per seed, the class means' aligned SSIM
    monkeypatch.setattr(regimes, "_floor_per_image", lambda regime, seed, data_dir: {"aligned_ssim": floor[seed]})
    regime = dataclasses.replace(TINY, images_per_client=2)
    stored = {  # client 1 of seed 0: images 2 and 3
        0: [dict(client=1, per_image=dict(aligned_ssim=[0.6, 0.95]))],
        1: [dict(client=0, per_image=dict(aligned_ssim=[0.59, 0.61]))],
    }
    rate = regimes.beyond_floor(regime, stored)
    assert (rate["recovered"], rate["n"]) == (3, 4)  # 0.6 > 0.5, 0.95 > 0.9, 0.61 > 0.1; 0.59 is not recovered
    floor[0][3] = 0.95  # as good as the class mean: not beyond it
    assert regimes.beyond_floor(regime, stored)["recovered"] == 2


def test_regime_m_closes_the_first_table_with_the_attack_that_recovers_most():
    def rate(recovered, n):
        return {"recovered": recovered, "n": n, "rate": recovered / n, "low": 0.1, "high": 0.9}

    results = {
        "M1": {
            "none": {"grnn": {"1": rate(2, 2)}, "ig": {"1": rate(1, 2), "8": rate(16, 16)}},
            "paper": {"ig": {"8": rate(11, 16)}},
            "spatial": {"ig": {"8": rate(0, 16)}},  # beyond the paper's lock: results/rounds.md only
        }
    }
    pooled = {"results": results, "settings": {"regimes": {"M1": "a new image each round"}}}
    threats = ["none", "oracle", regimes.ORDER_ORACLE, "adaptive"]
    rows = regimes_table.pooled_rows(pooled, threats)
    assert [row[0] for row in rows] == ["M1, K = 1", "M1, K = 8"]
    assert "one capture" in rows[0][1] and "8 captures pooled" in rows[1][1]
    assert rows[0][3:] == ["**100 %** [10, 90] (2/2), GRNN", "not run", "does not apply", "not run"]
    assert rows[1][3:] == [
        "**100 %** [10, 90] (16/16), IG",
        "not run",
        "does not apply",
        "**69 %** [10, 90] (11/16), IG",
    ]
