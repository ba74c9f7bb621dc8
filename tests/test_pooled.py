"""Pooled attacks: one client's captures over rounds attacked together (its images per capture, its lock shared)."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import attacks
from attacks import cases, pooled, prior, targets
from attacks import labels as labels_lib
from attacks import model as model_lib
from tfkl import capture as capture_lib
from tfkl import models, private

SHAPE = (8, 8, 1)


def _victim(affine="channel", seed=3):
    return models.build("lenet", SHAPE, 4, lock=True, init="pytorch", seed=seed, affine=affine)


def _images(count, seed):
    rng = np.random.default_rng(seed)
    smooth = rng.uniform(0, 1, (count, 4, 4, 1)).astype(np.float32)
    return tf.image.resize(smooth, SHAPE[:2]).numpy(), rng.integers(0, 4, count)


def _rounds(victim, tmp_path, count, moves_lock=True, per_capture=2):
    """`count` captures of one client: before each round the global weights move and (if `moves_lock`) the
    client's lock weights with them. Returns (captures, per-round secrets, images, labels)."""
    rng = np.random.default_rng(7)
    captures, secrets, images, labels = [], [], [], []
    for round_num in range(count):
        for variable in private.shared_variables(victim):
            variable.assign(variable + rng.normal(0, 0.02, variable.shape).astype(np.float32))
        if moves_lock:
            for variable in [v for lock in private.lock_layers(victim) for v in lock.private_weights[1:]]:
                variable.assign(variable + rng.normal(0, 0.02, variable.shape).astype(np.float32))
        x, y = _images(per_capture, seed=round_num)
        path = str(tmp_path / f"round_{round_num}.npz")
        captures.append(cases.client_update_capture(victim, x, y, path, batch_size=1, round_num=round_num + 1))
        secrets.append(model_lib.extract_secret(victim))
        images.append(x)
        labels.append(y)
    return captures, secrets, np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("affine", ["channel", "spatial"])
def test_with_the_true_locks_the_pooled_prediction_matches_every_capture(affine, tmp_path):
    victim = _victim(affine)
    captures, secrets, x, y = _rounds(victim, tmp_path, 3)
    view, pool = pooled.pool_captures(captures, lock_weights=tuple(secrets))
    attacker = model_lib.AttackerModel(view, "oracle", secret=secrets[0])
    with attacker.bound(targets.pooled_tensors(attacker, pool)):
        predicted = targets.simulate(attacker, pool, tf.constant(x), tf.constant(y), tf.zeros([0]))
    assert len(predicted) == len(pool.values) == 3 * len(pool.member.values)
    for p, t in zip(predicted, pool.values):
        np.testing.assert_allclose(p.numpy(), t, atol=1e-5)


def _objective_and_gradient(attack, target, position, labels):
    values = [tf.constant(v * base_scale(target), tf.float32) for v in target.values]
    with attack.attacker.bound(attack._model_tensors(target)):
        with tf.GradientTape() as tape:
            tape.watch(position)
            value = attack.objective(position, values, tf.constant(labels), target)
    return float(value), tape.gradient(value, position).numpy()


def base_scale(target):
    return 1.0 / target.learning_rate if target.kind == "update" else 1.0


def test_a_pool_of_copies_of_one_capture_is_the_single_capture_attack(tmp_path):
    victim = _victim("spatial")
    (capture,), _, x, y = _rounds(victim, tmp_path, 1)
    single = targets.from_capture(capture)
    view, pool = pooled.pool_captures([capture] * 3)
    attack = attacks.InvertingGradients(model_lib.AttackerModel(view, "adaptive"), iterations=4, chunk=2, restarts=1)
    lock = attack._initial_lock(single, 1, seed=0)[0]
    image = x.reshape(-1)
    single_value, single_gradient = _objective_and_gradient(
        attack, single, tf.constant(np.concatenate([image, lock]), tf.float32), y
    )
    pool_value, pool_gradient = _objective_and_gradient(
        attack, pool, tf.constant(np.concatenate([image] * 3 + [lock]), tf.float32), np.tile(y, 3)
    )
    np.testing.assert_allclose(pool_value, single_value, rtol=1e-5)
    lock_part = slice(3 * image.size, None)
    np.testing.assert_allclose(pool_gradient[lock_part], single_gradient[image.size :], rtol=1e-3, atol=1e-7)
    for k in range(3):  # each copy's images get a third of the single attack's gradient
        copy = pool_gradient[k * image.size : (k + 1) * image.size]
        np.testing.assert_allclose(3 * copy, single_gradient[: image.size], rtol=1e-3, atol=1e-7)
    one_view, one = pooled.pool_captures([capture])
    attack_one = attacks.InvertingGradients(model_lib.AttackerModel(one_view, "adaptive"), attack.config)
    np.testing.assert_allclose(attack_one.reconstruct(one).images, attack.reconstruct(single).images, atol=1e-6)


def test_held_out_entries_never_enter_the_fit_and_the_drift_is_chosen_by_them(tmp_path):
    victim = _victim("channel")
    captures, _, x, y = _rounds(victim, tmp_path, 2)
    view, pool = pooled.pool_captures(captures, drift=1.0, holdout=0.3, seed=5)
    attack = attacks.InvertingGradients(model_lib.AttackerModel(view, "adaptive"), iterations=6, chunk=3, restarts=2)
    assert attack._lock_size(pool) == 3 * attack.attacker.lock_latent_size()  # shared + one offset per capture
    position = tf.constant(attack._initial(pool, 1, seed=0)[0])
    value = _objective_and_gradient(attack, pool, position, y)[0]
    first = pool.members[0]
    held = pool.held_out(0, first.values[0].shape)
    assert 0 < held.mean() < 0.5
    moved_values = (np.where(held, first.values[0] + 1.0, first.values[0]),) + first.values[1:]
    moved = dataclasses.replace(pool, members=(dataclasses.replace(first, values=moved_values),) + pool.members[1:])
    assert _objective_and_gradient(attack, moved, position, y)[0] == pytest.approx(value, rel=1e-6)
    labels = np.concatenate([np.asarray(y)])
    assert attack.held_out_loss(position.numpy(), moved, labels) != attack.held_out_loss(position.numpy(), pool, labels)
    rec, scores = pooled.attack_pool(attack, pool, drifts=(0.0, 1.0), holdout=0.3)
    assert set(scores) == {0.0, 1.0} and rec.info["drift"] == min(scores, key=scores.get)
    assert rec.info["held_out_loss"] == scores[rec.info["drift"]] and rec.images.shape == (4,) + SHAPE


def test_a_capture_of_another_client_or_model_is_refused_in_one_line(tmp_path):
    victim = _victim("channel")
    captures, _, _, _ = _rounds(victim, tmp_path, 2, moves_lock=False)
    other_client = capture_lib.Capture(dict(captures[1].meta, client_id="9"), *captures[1][1:])
    with pytest.raises(pooled.PoolError, match="capture 1 is of client 9") as error:
        pooled.pool_captures([captures[0], other_client])
    assert "\n" not in str(error.value)
    other = cases.client_update_capture(
        _victim("spatial"), *_images(2, 0), str(tmp_path / "other.npz"), batch_size=1, client_id="0"
    )
    with pytest.raises(pooled.PoolError, match="differs from capture 0 in architecture") as error:
        pooled.pool_captures([captures[0], other], names=["capture 0", "capture 1"])
    assert "\n" not in str(error.value)
    bigger = cases.client_update_capture(victim, *_images(4, 0), str(tmp_path / "bigger.npz"), batch_size=1)
    with pytest.raises(pooled.PoolError, match="num_examples"):
        pooled.pool_captures([captures[0], bigger])


@pytest.mark.slow
@pytest.mark.parametrize("attack_name", ["grnn", "prior"])
def test_every_adam_attack_runs_pooled_and_estimates_one_lock(attack_name, tmp_path):
    victim = models.build("lenet", (8, 8, 1), 4, lock=True, init="pytorch", seed=3)
    captures, _, x, _ = _rounds(victim, tmp_path, 2)
    view, pool = pooled.pool_captures(captures)
    attacker = model_lib.AttackerModel(view, "adaptive")
    if attack_name == "grnn":
        attack = attacks.GRNN(attacker, iterations=20, chunk=10, restarts=2)
    else:
        decoder = prior.build_decoder(SHAPE, 4)
        attack = prior.GenerativePrior(attacker, decoder, iterations=20, chunk=10)
    rec = attack.reconstruct(pool)
    assert rec.images.shape == x.shape and rec.info["pooled"] == 2
    gamma, beta = next(iter(rec.info["lock_estimate"].values()))
    assert len(gamma) == attacker.locks[0].affine_size and np.isfinite(rec.loss)


def _kept_images_rounds(victim, tmp_path, orders, batch_size=2):
    """Captures of a client that trains the same 4 images every round, round k in `orders[k]`, the global weights
    moving between rounds. Returns (captures, per-round secrets, images, labels)."""
    rng = np.random.default_rng(11)
    x, _ = _images(4, seed=0)
    y = np.array([0, 1, 2, 2])
    captures, secrets = [], []
    for round_num, order in enumerate(orders):
        for variable in private.shared_variables(victim):
            variable.assign(variable + rng.normal(0, 0.02, variable.shape).astype(np.float32))
        path = str(tmp_path / f"kept_{round_num}.npz")
        capture = cases.client_update_capture(
            victim, x[list(order)], y[list(order)], path, batch_size=batch_size, round_num=round_num + 1
        )
        captures.append(capture)
        secrets.append(model_lib.extract_secret(victim))
    return captures, secrets, x, y


ORDERS = ((0, 1, 2, 3), (2, 0, 3, 1), (3, 2, 1, 0))


@pytest.mark.parametrize("affine", ["channel", "spatial"])
def test_a_client_that_keeps_its_images_is_one_shared_set_trained_in_each_captures_order(affine, tmp_path):
    victim = _victim(affine)
    captures, secrets, x, y = _kept_images_rounds(victim, tmp_path, ORDERS)
    view, pool = pooled.pool_captures(captures, lock_weights=tuple(secrets))
    pool = dataclasses.replace(pool, orders=ORDERS)
    assert pool.num_examples == 4 and len(pool.values) == 3 * len(pool.member.values)
    attacker = model_lib.AttackerModel(view, "oracle", secret=secrets[0])
    with attacker.bound(targets.pooled_tensors(attacker, pool)):
        predicted = targets.simulate(attacker, pool, tf.constant(x), tf.constant(y), tf.zeros([0]))
    for p, t in zip(predicted, pool.values):
        np.testing.assert_allclose(p.numpy(), t, atol=1e-5)
    with pytest.raises(ValueError, match="one permutation of range"):
        dataclasses.replace(pool, orders=ORDERS[:2])
    with pytest.raises(ValueError, match="one permutation of range"):
        dataclasses.replace(pool, orders=((0, 0, 1, 2),) * 3)


def test_each_captures_order_is_read_from_its_labels_equal_labels_in_turn(tmp_path, monkeypatch):
    victim = _victim("channel")
    orders = ((0, 1, 2, 3), (2, 0, 3, 1), (3, 2, 1, 0))
    captures, _, x, y = _kept_images_rounds(victim, tmp_path, orders)
    view, pool = pooled.pool_captures(captures)
    attacker = model_lib.AttackerModel(view, "adaptive")
    step_labels = iter([y[list(order)] for order in orders])  # each capture's labels, as its label inference finds
    monkeypatch.setattr(labels_lib, "label_hypotheses", lambda attacker, member, count: [next(step_labels)])
    found = pooled.label_orders(attacker, pool).orders
    # shared set = the first capture's images in its order; member k trains shared[found[k]] = x[orders[k]]
    for order, assumed in zip(orders, found):
        np.testing.assert_array_equal(y[list(orders[0])][list(assumed)], y[list(order)])
    # images 2 and 3 share label 2: matched in turn, so the third capture (3, 2, 1, 0) is assumed (2, 3, 1, 0)
    assert found[0] == (0, 1, 2, 3) and found[1] == (2, 0, 3, 1) and found[2] == (2, 3, 1, 0)


def test_an_attack_on_a_kept_images_pool_rebuilds_one_set_scored_against_the_first_capture(tmp_path):
    victim = _victim("channel")
    captures, _, x, y = _kept_images_rounds(victim, tmp_path, ORDERS)
    view, pool = pooled.pool_captures(captures)
    pool = dataclasses.replace(pool, orders=ORDERS)
    attack = attacks.InvertingGradients(model_lib.AttackerModel(view, "adaptive"), iterations=4, chunk=2, restarts=1)
    rec = attack.reconstruct(pool)
    assert rec.images.shape == x.shape and rec.info["pooled"] == 3 and len(rec.labels) == 4
    per_image, order = pooled.score(rec, [cases.UserData(x, y)])
    assert len(per_image["aligned_ssim"]) == 4 and sorted(order) == [0, 1, 2, 3]
    _, one = pooled.pool_captures(captures[:1])  # one capture: a shared set in its own order is the plain pool
    shared = dataclasses.replace(one, orders=ORDERS[:1])
    np.testing.assert_allclose(attack.reconstruct(shared).images, attack.reconstruct(one).images, atol=1e-6)
