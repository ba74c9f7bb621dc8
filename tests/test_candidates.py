"""The key-lock candidates (experiments.studies.candidates): their layers, the attacker's view of them, the table."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from attacks import base, cases, experiment, targets
from attacks import model as attacks_model
from experiments import common
from experiments.studies import adaptive_attacker, candidates, regimes
from experiments.studies.candidates import run as candidates_run
from experiments.studies.candidates import table as candidates_table
import tfkl
from tfkl.federated.config import Config

SHAPE = (32, 32, 1)


def _config(name, **overrides):
    """The training Config of candidate `name` (its tff_programs.train flags, on a small key)."""
    fields = {}
    for flag in candidates.CANDIDATES[name].train_flags:
        key, value = flag[2:].split("=")
        fields[key] = float(value) if key == "prune_fraction" else value
    return Config(model="lenet", input_shape=SHAPE, key_dim=16, seed=1, **{**fields, **overrides})


@pytest.mark.parametrize("name", list(candidates.CANDIDATES))
def test_every_candidate_round_trips_get_config_and_saves_and_loads(name, tmp_path):
    model = _config(name).model_fn()()
    locks = tfkl.private.lock_layers(model)
    assert locks
    x = tf.constant(np.random.default_rng(0).random((2,) + SHAPE, np.float32))
    rebuilt = tf.keras.Model.from_config(model.get_config())
    assert [lock.get_config() for lock in tfkl.private.lock_layers(rebuilt)] == [lock.get_config() for lock in locks]
    rebuilt.set_weights(model.get_weights())
    np.testing.assert_allclose(rebuilt(x).numpy(), model(x).numpy(), rtol=1e-6)
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-6)


def test_candidates_lock_what_they_say():
    layers = {name: tfkl.private.lock_layers(_config(name).model_fn()()) for name in candidates.CANDIDATES}
    assert [lock.name for lock in layers["paper"]] == ["conv1_keylock"]
    assert [lock.name for lock in layers["first_two"]] == ["conv1_keylock", "conv2_keylock"]
    assert len(layers["every_conv"]) == 3
    assert layers["group"][0].normalization == "group"
    spatial = layers["spatial"][0]
    assert spatial.affine_shape == (16, 16, 12) and spatial.scale_kernel.shape == (16, 16 * 16 * 12)
    assert _config("every_conv").statistics == "local" and _config("pruned").prune_fraction == 0.9
    assert _config("spatial_gaussian").key_distribution == "gaussian"


@pytest.mark.parametrize("training", [True, False])
def test_spatial_lock_is_gamma_times_normalized_plus_beta_per_position(training):
    seeded = tf.keras.initializers.RandomUniform(-0.5, 0.5, seed=1)  # an unseeded ReLU lock may be all 0 at two spots
    lock = tfkl.KeyLock(key_dim=8, affine="spatial", key=np.linspace(0, 1, 8), lock_initializer=seeded)
    x = tf.constant(np.random.default_rng(1).normal(size=(4, 5, 6, 3)), tf.float32)
    outputs = lock(x, training=training)
    gamma, beta = lock.lock_parameters()
    assert gamma.shape == beta.shape == (5, 6, 3)
    if training:
        mean, variance = tf.nn.moments(x, [0, 1, 2])
    else:
        mean, variance = tf.zeros([3]), tf.ones([3])
    expected = gamma * (x - mean) / tf.sqrt(variance + lock.epsilon) + beta
    np.testing.assert_allclose(outputs.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(gamma.numpy(), gamma.numpy()[:1, :1])  # it varies over space


def test_spatial_lock_bad_inputs_are_one_clear_error():
    with pytest.raises(ValueError, match="affine must be one of"):
        tfkl.KeyLock(affine="pixel")
    with pytest.raises(ValueError, match="spatial KeyLock needs a fixed input size"):
        tfkl.KeyLock(key_dim=4, affine="spatial")(tf.keras.Input((None, None, 3)))


def test_secure_locks_the_first_n_layers_and_refuses_other_counts():
    backbone = tfkl.models.build("lenet", SHAPE, 10, lock=False, seed=0)
    secured = tfkl.secure(backbone, where=2, key_dim=4)
    assert [lock.name for lock in tfkl.private.lock_layers(secured)] == ["conv1_keylock", "conv2_keylock"]
    for where in (0, 4):
        with pytest.raises(ValueError, match="lockable layers"):
            tfkl.secure(backbone, where=where, key_dim=4)


def test_layer_and_attacker_run_the_same_spatial_lock_forward():
    victim = tfkl.models.build("lenet", (8, 8, 1), 4, lock=True, seed=3, key_dim=8, affine="spatial")
    x = tf.constant(np.random.default_rng(9).random((4, 8, 8, 1), np.float32))
    view = attacks_model.ServerView.from_model(victim)
    oracle = attacks_model.AttackerModel(view, "oracle", secret=attacks_model.extract_secret(victim))
    predicted = oracle(oracle.weights, x, oracle.lock_values(), training=True)
    np.testing.assert_allclose(predicted.numpy(), victim(x, training=True).numpy(), rtol=1e-5, atol=1e-6)
    adaptive = attacks_model.AttackerModel(view, "adaptive")
    assert adaptive.lock_latent_size() == 2 * 4 * 4 * 12  # gamma and beta at every position and channel
    latent = adaptive.initial_lock_latent(1)[0]
    gamma, beta = adaptive.lock_values(latent)["conv1_keylock"]
    assert gamma.shape == beta.shape == (4, 4, 12)
    # A zero gamma at one position leaves the kernel's gradient from the others: no channel is read as dead.
    trainable = [np.zeros(w.shape) for w, t in zip(view.weights, view.trainable) if t]
    assert not np.any(adaptive.dead_lock_channels(trainable).numpy())


def test_a_pruned_target_is_matched_on_its_kept_entries_only():
    victim = tfkl.models.build("lenet", (8, 8, 1), 4, lock=False, seed=3)
    images = np.random.default_rng(2).random((1, 8, 8, 1)).astype(np.float32)
    gradient = cases.client_gradient(victim, images, np.array([1]))
    kept = [np.where(np.abs(g) >= np.quantile(np.abs(g), 0.9), g, 0.0) for g in gradient.values]
    pruned = dataclasses.replace(gradient, values=tuple(kept), pruned=True)
    attacker = attacks_model.AttackerModel(attacks_model.ServerView.from_model(victim), "none")
    attack = base.Attack(attacker, base.AttackConfig(distance="l2", tv=0.0))
    position = tf.constant(images.reshape(-1))
    labels = tf.constant([1])
    values = [tf.constant(v) for v in kept]
    # The true image explains every kept entry exactly; unpruned matching would count the zeroed ones.
    assert float(attack.objective(position, values, labels, pruned)) < 1e-10
    assert float(attack.objective(position, values, labels, dataclasses.replace(pruned, pruned=False))) > 0.01
    assert targets.Target("gradient", (), 1, 1).pruned is False


def _entry(ssim):
    return {"aligned_ssim": ssim, "aligned_psnr": 30.0 if ssim >= 0.6 else 10.0}


def test_the_table_applies_every_ship_target(tmp_path, monkeypatch):
    names = ["paper", "spatial"]
    recovered = {"paper": 9, "spatial": 0, "none": 10, "none_pruned": 10}
    for name, count in recovered.items():
        for attack in candidates.ATTACKS:
            for image in range(candidates.NUM_IMAGES):
                path = candidates.image_path(str(tmp_path), name, attack, 0, image)
                common.write_json(path, _entry(0.9 if image < count else 0.1))
    row = lambda own, random_key: {  # noqa: E731  (key_table.row_of's fields)
        "own": own,
        "a_own_key_and_lock": own,
        "b_own_lock_random_key": random_key,
        "c_other_key_and_lock": own,
        "d_global_zero_lock": 0.1,
        **{f"{k}_{size}": v for size in (100, 1000) for k, v in (("recovery", 0.8), ("scratch", 0.64), ("gain", 0.16))},
    }
    training = {
        "lenet": {"control": {0: {"own": 0.85}}, "paper": {0: row(0.84, 0.84)}, "spatial": {0: row(0.845, 0.15)}},
        "resnet": {},
    }
    payload = candidates_table.tabulate(names, [0], str(tmp_path), training, None)
    summary = payload["results"]["by_configuration"]
    assert summary["paper"]["meets_target"] is False and summary["paper"]["checks"]["privacy"] is False
    # 0/10 has a Wilson upper bound of 28 % > 15 %: ten images cannot show the target.
    assert summary["spatial"]["checks"] == {"privacy": False, "accuracy": True, "random_key": True}
    assert summary["none"]["success"]["grnn"]["ssim"]["recovered"] == 10
    assert payload["results"]["best_trade_off"] == "spatial"
    key_rows = payload["tables"][1]["rows"]
    assert [r[0] for r in key_rows] == [candidates.CONTROL.label] + [candidates.CANDIDATES[n].label for n in names]
    assert key_rows[2][3] == "15.0" and key_rows[2][-2:] == ["reached", "not reached"]  # gain 16 pp > 5 pp
    candidates_table.frontier_figure(payload, str(tmp_path / "frontier.png"))
    assert (tmp_path / "frontier.png").stat().st_size > 0


def _score(recovered, n, complete=True):
    entries = [_entry(0.9 if i < recovered else 0.1) for i in range(n)]
    return dict(adaptive_attacker.score(entries), complete=complete)


def test_the_ship_target_applies_only_where_the_unprotected_client_leaks():
    ig, grnn = candidates.UPDATE_ATTACKS
    held = {attack: _score(0, 100) for attack in candidates.ATTACKS}  # 0/100: Wilson upper bound 3.7 %
    leaks = {attack: _score(100, 100) for attack in candidates.ATTACKS}
    rebuilt_updates = dict(held, **{ig: _score(50, 100), grnn: _score(0, 100)})
    check = candidates_table.privacy_check
    assert check(rebuilt_updates, dict(leaks, **{ig: _score(8, 100), grnn: _score(40, 100)})) is True
    assert check(rebuilt_updates, dict(leaks, **{ig: _score(8, 100), grnn: _score(60, 100)})) is False
    assert check(rebuilt_updates, dict(leaks, **{ig: _score(8, 100)})) is None  # GRNN's reference is due
    assert check(held, dict(leaks, **{ig: _score(8, 100), grnn: _score(60, 100)})) is None  # its update cells are due
    all_held = dict(held, **{ig: _score(0, 100), grnn: _score(0, 100)})
    assert check(all_held, dict(leaks, **{ig: _score(60, 100), grnn: _score(90, 100)})) is True
    assert check(dict(all_held, **{candidates.ATTACKS[0]: _score(9, 100)}), leaks) is False  # batch 1 fails first


def test_the_update_cells_are_the_regimes_u8_with_the_step_labels_given():
    u8 = regimes.REGIMES["U8"]
    assert candidates.UPDATE_TRAINING == u8.update_options()
    assert (candidates.UPDATE["clients"], candidates.UPDATE["images_per_client"]) == (u8.clients, u8.images_per_client)
    for name, options in candidates.UPDATE_ATTACKS.items():
        attack = name.split("-")[0]
        assert options["label_mode"] == "given"
        assert dataclasses.replace(u8, attack=attack).attack_options().items() <= options.items()
    names = candidates.update_names("grnn-u8", list(candidates.CANDIDATES), ["spatial"])
    assert names == ["none", "none_pruned", "spatial"]
    ig_names = candidates.update_names("ig-u8", ["paper", "spatial"], ["spatial"])
    assert ig_names == ["none", "none_pruned", "paper", "spatial"]


def test_a_candidate_holds_once_adaptive_grnn_recovers_none_of_its_images_at_every_seed(tmp_path):
    def store(name, seeds, ssim):
        for seed in seeds:
            for image in range(candidates.NUM_IMAGES):
                path = candidates.image_path(str(tmp_path), name, "grnn", seed, image)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump({"aligned_ssim": ssim(seed, image), "aligned_psnr": 10.0}, f)

    store("spatial", [0, 1], lambda seed, image: 0.3)
    store("paper", [0, 1], lambda seed, image: 0.9 if (seed, image) == (1, 3) else 0.3)  # one image recovered
    store("pruned", [0], lambda seed, image: 0.3)  # seed 1 not attacked yet
    assert candidates.holding(["paper", "spatial", "pruned", "none"], [0, 1], str(tmp_path)) == ["spatial"]


def test_an_update_cell_attacks_whole_clients_caches_each_image_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(candidates_run, "DATASET", "digits")
    for module in (candidates, candidates_run):  # read by the cells' sizes and by the attack
        monkeypatch.setattr(module, "UPDATE", dict(clients=2, images_per_client=4))
    update = "grnn-u8"
    monkeypatch.setitem(candidates.UPDATE_ATTACKS, update, dict(candidates.UPDATE_ATTACKS[update], iterations=4))
    attacked = []
    run_attack = experiment.run_attack

    def recording(attack, payload, threat, *args, oracle_labels=None, **kwargs):
        attacked.append((threat, [t.kind for t in payload.targets], oracle_labels))
        return run_attack(attack, payload, threat, *args, oracle_labels=oracle_labels, **kwargs)

    monkeypatch.setattr(experiment, "run_attack", recording)
    run_dir = str(tmp_path)
    candidates_run.run_cell(run_dir, "pruned", update, 0, log=lambda *_: None)
    entries = candidates.cached_images(run_dir, "pruned", update, 0)
    assert sorted(entries) == list(range(8))
    threat, kinds, labels = attacked[0]
    assert threat == "adaptive" and kinds == ["update", "update"] and labels.shape == (2, 4)
    assert all(e["label_accuracy"] == 1.0 and e["threat"] == "adaptive" for e in entries.values())
    assert {e["aligned_ssim"] for e in entries.values()} and all(0 <= e["aligned_ssim"] <= 1 for e in entries.values())
    candidates_run.run_cell(run_dir, "pruned", update, 0, log=lambda *_: None)
    assert len(attacked) == 1  # everything cached: nothing runs
    os.remove(candidates.image_path(run_dir, "pruned", update, 0, 5))
    candidates_run.run_cell(run_dir, "pruned", update, 0, log=lambda *_: None)
    assert len(attacked[1][1]) == 1 and len(candidates.cached_images(run_dir, "pruned", update, 0)) == 8


def test_overhead_times_each_distinct_model_against_the_control(tmp_path):
    names = ["paper", "private_init", "every_conv"]  # the first two share one model
    result = candidates_run.measure_overhead(names, str(tmp_path), steps=1, repeats=2, log=lambda *_: None)
    assert set(result["ratio_to_control"]) == set(names) and result["repeats"] == 2
    assert result["seconds_per_step"]["paper"] == result["seconds_per_step"]["private_init"]
    assert all(r > 0 for r in result["ratio_to_control"].values())
    assert os.path.exists(tmp_path / "overhead.json")
