"""The generative-prior attack: its decoder, its two stages, and its errors."""

import numpy as np
import pytest
import tensorflow as tf

from attacks import base, cases, prior
from attacks import model as model_lib
from attacks.ig import adam_chunk
from tfkl import models

SHAPE = (8, 8, 1)
LATENT = 4


def _images(count, seed=0):
    rng = np.random.default_rng(seed)
    return tf.image.resize(rng.uniform(0, 1, (count, 2, 2, 1)), SHAPE[:2]).numpy().astype(np.float32)


def _attacker():
    victim = models.build("lenet", SHAPE, 4, lock=False, init="pytorch", seed=3)
    return victim, model_lib.AttackerModel(model_lib.ServerView.from_model(victim), "none")


def test_decoder_learns_its_images_and_makes_the_model_inputs():
    losses = []
    decoder = prior.train_decoder(_images(128), LATENT, epochs=6, batch_size=32, log=losses.append)
    first, last = (float(line.rsplit(" ", 1)[1]) for line in (losses[0], losses[-1]))
    assert len(losses) == 6 and last < first
    images = decoder(tf.random.normal([3, LATENT])).numpy()
    assert images.shape == (3,) + SHAPE and images.min() >= 0.0 and images.max() <= 1.0


def test_the_codes_move_first_then_the_pixels():
    victim, attacker = _attacker()
    images, labels = _images(2), np.array([0, 1])
    target = cases.client_gradient(victim, images, labels)
    decoder = prior.build_decoder(SHAPE, LATENT)
    codes = 2 * LATENT

    def final_position(iterations, latent_iterations):
        config = prior.PriorConfig(
            iterations=iterations, latent_iterations=latent_iterations, chunk=iterations, label_mode="given"
        )
        attack = prior.GenerativePrior(attacker, decoder, config)
        initial = attack._initial(target, 1, seed=0)
        values = [tf.constant(np.asarray(t)[None]) for t in target.values]
        position = attack._optimize(target, initial, values, tf.constant(labels[None]), None, None)[0]
        return initial.numpy()[0], position[0]

    start, latent_only = final_position(3, 3)
    assert np.any(latent_only[:codes] != start[:codes]) and np.all(latent_only[codes:] == 0.0)
    start, pixels_only = final_position(3, 0)
    assert np.all(pixels_only[:codes] == start[:codes]) and np.any(pixels_only[codes:] != 0.0)
    _, two_latent_steps = final_position(2, 2)
    _, switched = final_position(4, 2)  # two steps on the codes, then two on the pixels
    np.testing.assert_allclose(switched[:codes], two_latent_steps[:codes], rtol=1e-6)
    assert np.any(switched[codes:] != 0.0)


def test_adam_started_again_forgets_the_first_stage():
    # Two steps on large gradients, then a tiny one the other way: a fresh Adam takes a full step along it (its
    # first step is learning_rate * sign(gradient)); Adam's old moments carry on the first way.
    def third_step(fresh_at):
        gradients = iter([1.0, 1.0, -1e-3])
        position, *_ = adam_chunk(
            lambda position: (tf.zeros([1]), tf.fill([1, 1], next(gradients))),
            tf.zeros([1, 1]),
            tf.zeros([1, 1]),
            tf.zeros([1, 1]),
            tf.constant(0.0),
            3,
            lambda step: 1.0,
            False,
            lambda p: p,
            fresh_at,
        )
        return float(position[0, 0]) + 2.0  # the first two steps: -1 each

    assert third_step(2) == pytest.approx(1.0, rel=1e-3)
    assert third_step(0) < 0.0


def test_bad_decoder_or_stages_are_one_value_error():
    _, attacker = _attacker()
    with pytest.raises(ValueError, match="the decoder makes"):
        prior.GenerativePrior(attacker, prior.build_decoder((16, 16, 1), LATENT))
    with pytest.raises(ValueError, match="latent_iterations"):
        prior.GenerativePrior(attacker, prior.build_decoder(SHAPE, LATENT), iterations=10, latent_iterations=11)
    with pytest.raises(ValueError, match="multiples of 8"):
        prior.build_decoder((28, 28, 1), LATENT)
    with pytest.raises(ValueError, match="not 'joint'"):
        prior.GenerativePrior(attacker, prior.build_decoder(SHAPE, LATENT), label_mode="joint")
    with pytest.raises(ValueError, match="distance must be one of"):
        prior.GenerativePrior(attacker, prior.build_decoder(SHAPE, LATENT), distance="x")
    assert base.check_distance("grnn") == "grnn"
