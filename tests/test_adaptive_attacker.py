"""The adaptive attacker's strategies: they run, keep the restart with the lowest
objective, read only the captured gradient, and the per-image best-of is labelled an upper bound."""

import inspect
import json

import numpy as np
import pytest
import tensorflow as tf

from attacks import base, cases, experiment
from attacks import model as model_lib
from experiments.studies import adaptive_attacker
from tfkl import models, private
from tfkl.keylock import lock_affine

SHAPE = (8, 8, 1)


def _case(seed=3):
    victim = models.build("lenet", SHAPE, 4, lock=True, init="pytorch", seed=seed)
    rng = np.random.default_rng(0)
    x = tf.image.resize(rng.uniform(0, 1, (2, 4, 4, 1)).astype(np.float32), SHAPE[:2]).numpy()
    y = rng.integers(0, 4, 2)
    payload, truth = cases.simulate_clients(victim, x, y, 1)
    return victim, payload, truth


def _true_gamma(victim):
    (lock,) = private.lock_layers(victim)
    secret = model_lib.extract_secret(victim)[lock.name]
    return lock_affine(*[tf.constant(v, tf.float32) for v in secret], lock.activation)[0].numpy()


def test_dead_channels_are_read_from_the_gradient_alone_and_are_the_zero_gammas():
    victim, payload, _ = _case()
    gamma = _true_gamma(victim)
    assert 0 < np.sum(gamma == 0) < len(gamma)  # the case has dead and live channels
    for variable in private.private_variables(victim):  # the attacker never reads the secret
        variable.assign(tf.fill(variable.shape, np.nan))
    attacker = model_lib.AttackerModel(payload.view, "adaptive")
    assert attacker.lock_sources() == [0]  # conv1's kernel, the first trainable shared variable
    dead = attacker.dead_lock_channels(list(payload.targets[0].values)).numpy()
    channels = len(gamma)
    np.testing.assert_array_equal(dead[:channels], gamma == 0)
    assert not dead[channels:].any()  # betas are never fixed


CASES = (
    [("ig", strategy) for strategy in base.ADAPTIVE_STRATEGIES]
    + [
        (attack, "relearn-mixed")
        for attack in ("grnn", "idlg", "dlg")  # both start schemes and the dead channels
    ]
    + [("grnn", "relearn-alternating")]
)


@pytest.mark.parametrize("attack,strategy", CASES)
def test_every_strategy_runs_and_keeps_the_restart_with_the_lowest_objective(attack, strategy):
    _, payload, truth = _case()
    options = dict(iterations=6, chunk=3, restarts=3, adaptive_strategy=strategy)
    final = []
    attacker = model_lib.AttackerModel(payload.view, "adaptive", seed=7)
    attack_obj = experiment.build_attack(attack, attacker, **options)
    # The attack's interface holds no truth: it gets the targets (and optional labels for label_mode='given').
    assert set(inspect.signature(attack_obj.reconstruct).parameters) == {"targets", "labels", "progress", "monitor"}
    reconstructions = attack_obj.reconstruct(list(payload.targets), monitor=lambda snap: final.append(snap.losses))
    losses = np.asarray(final[-1]).reshape(len(payload.targets), 3)
    for rec, own in zip(reconstructions, losses):
        np.testing.assert_allclose(rec.info["restart_losses"], own, rtol=1e-5)
        assert rec.info["best_restart"] == int(np.argmin(own))
        assert rec.loss == pytest.approx(float(np.min(own)), rel=1e-5)
        assert rec.info["adaptive_strategy"] == strategy
        assert ("dead_channels" in rec.info) == base.ADAPTIVE_STRATEGIES[strategy].fixes_dead_channels
    per_image = experiment.evaluate(reconstructions, truth.images, truth.labels, 1)  # the truth, only now
    assert np.all(np.isfinite(per_image["aligned_psnr"]))


def test_relearn_reports_exactly_zero_gamma_for_the_dead_channels():
    victim, payload, _ = _case()
    gamma = _true_gamma(victim)
    attacker = model_lib.AttackerModel(payload.view, "adaptive")
    rec = experiment.build_attack("ig", attacker, iterations=4, chunk=4, restarts=1, adaptive_strategy="relearn")
    (estimate,) = rec.reconstruct(payload.targets[0]).info["lock_estimate"].values()
    assert np.all(np.asarray(estimate[0])[gamma == 0] == 0)


def test_prior_starts_look_like_a_fresh_lock_and_uniform_keeps_its_old_values():
    _, payload, _ = _case()
    attacker = model_lib.AttackerModel(payload.view, "adaptive")
    old = attacker.initial_lock_latent(4, seed=2).numpy()
    np.testing.assert_array_equal(attacker.initial_lock_latent(4, seed=2, schemes=["uniform"] * 4).numpy(), old)
    mixed = attacker.initial_lock_latent(4, seed=2, schemes=["prior", "uniform"] * 2).numpy()
    gamma = tf.nn.softplus(mixed[:, :12]).numpy()
    assert np.all(gamma[1::2] >= 0.5)  # uniform: U(0.5, 1.5)
    assert np.mean(gamma[0::2] < 0.01) > 0.2  # prior: many (floored) zeros, as relu(key @ W + b)


def test_the_alternating_strategy_moves_the_images_and_the_lock_in_turns():
    _, payload, _ = _case()
    target = payload.targets[0]
    for threat, strategy, turns in (("adaptive", "relearn-alternating", True), ("adaptive", "relearn", False)):
        attack = experiment.build_attack(
            "ig", model_lib.AttackerModel(payload.view, threat), adaptive_strategy=strategy
        )
        image_size, label_size, lock_size = attack._layout(target)
        scale = attack._lock_rate_scale(target, 0.5)
        for step, lock_turn in ((1, False), (base.ALTERNATION_STEPS, False), (base.ALTERNATION_STEPS + 1, True)):
            values = scale(tf.constant(float(step))).numpy()
            images, lock = values[: image_size + label_size], values[image_size + label_size :]
            assert len(lock) == lock_size > 0
            if turns:
                assert (images == (0.0 if lock_turn else 1.0)).all() and (lock == (0.5 if lock_turn else 0.0)).all()
            else:
                assert (images == 1.0).all() and (lock == 0.5).all()


def test_bad_adaptive_parameters_give_one_clear_error():
    _, payload, _ = _case()
    attacker = model_lib.AttackerModel(payload.view, "adaptive")
    with pytest.raises(ValueError, match="adaptive_strategy must be one of"):
        experiment.build_attack("ig", attacker, adaptive_strategy="strongest")
    for value in (0, -1e-3, "fast"):
        with pytest.raises(ValueError, match="lock_learning_rate must be None or a positive number"):
            experiment.build_attack("grnn", attacker, lock_learning_rate=value)
    with pytest.raises(ValueError, match="lock init schemes must be among"):
        attacker.initial_lock_latent(2, schemes=["gaussian"])
    with pytest.raises(ValueError, match="L-BFGS moves every coordinate at once"):
        experiment.build_attack("dlg", attacker, adaptive_strategy="relearn-alternating")
    with pytest.raises(ValueError, match="unknown variant"):
        adaptive_attacker.options_of("ig", "adaptive:best")
    with pytest.raises(ValueError, match="unknown attack"):
        adaptive_attacker.options_of("ggl", "oracle")


def _fill_cache(cache, attack, variant, ssims):
    for seed in (0,):
        for image, ssim in enumerate(ssims):
            path = adaptive_attacker.cache_path(str(cache), attack, variant, seed, image)
            entry = {"aligned_ssim": ssim, "aligned_psnr": 10 + 10 * ssim, "options": {}}
            import os

            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(entry, f)


def test_best_of_is_computed_per_image_and_labelled_an_upper_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(adaptive_attacker, "NUM_IMAGES", 4)
    _fill_cache(tmp_path, "ig", "adaptive:joint", [0.7, 0.1, 0.1, 0.1])
    _fill_cache(tmp_path, "ig", "adaptive:relearn", [0.1, 0.7, 0.1, 0.1])
    _fill_cache(tmp_path, "grnn", "adaptive:relearn", [0.1, 0.1, 0.7, 0.1])
    _fill_cache(tmp_path, "grnn", "oracle", [0.9, 0.9, 0.9, 0.9])
    payload = adaptive_attacker.tabulate(str(tmp_path), ["ig", "grnn"], [0])
    by_attack = payload["results"]["by_attack"]
    assert by_attack["ig"]["adaptive:relearn"]["ssim"]["recovered"] == 1  # each real attacker: 1 of 4
    bounds = payload["results"]["upper_bound"]
    everything = bounds["all attacks: best over attacks and adaptive strategies"]
    assert everything["ssim"]["recovered"] == 3 and everything["n"] == 4
    assert bounds["ig: best over its adaptive strategies"]["ssim"]["recovered"] == 2
    assert all(b["label"].startswith("UPPER BOUND") for b in bounds.values())
    bound_table = payload["tables"][1]
    assert "UPPER BOUND" in bound_table["title"] and all(r[0].startswith("UPPER BOUND") for r in bound_table["rows"])
    assert not any("UPPER BOUND" in str(r[0]) for r in payload["tables"][0]["rows"])
