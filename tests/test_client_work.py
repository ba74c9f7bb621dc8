"""The round's client work and server update as plain TF functions: no TFF computation or context."""

import ast
import collections
import functools

import numpy as np
import pytest
import tensorflow as tf

import tfkl
from tfkl import optimizers, training
from tfkl.federated import client_work

SHAPE = (4, 4, 1)
KEY_DIM = 6
LEARNING_RATE = 0.1


def tiny_model(locked=True, round_noise=0.0):
    """Conv -> KeyLock (or BatchNorm) -> dense, with seeded weights: equal on every call."""
    seeded = lambda s: tf.keras.initializers.GlorotUniform(seed=s)  # noqa: E731
    inputs = tf.keras.Input(SHAPE)
    x = tf.keras.layers.Conv2D(3, 3, kernel_initializer=seeded(1), bias_initializer=seeded(2))(inputs)
    if locked:
        key = tfkl.generate_key(KEY_DIM, seed=0)
        x = tfkl.KeyLock(KEY_DIM, lock_initializer=seeded(3), key=key, round_noise=round_noise)(x)
    else:
        x = tf.keras.layers.BatchNormalization()(x)
    x = tf.keras.layers.Flatten()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, kernel_initializer=seeded(4))(x))


def plain_sgd():
    """One step from zero buffers: buffers = gradients, weights -= learning_rate * gradients."""
    return optimizers.TorchSGD(LEARNING_RATE, momentum=0.9, nesterov=False, weight_decay=0.0)


def batch(size=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((size,) + SHAPE).astype(np.float32), rng.integers(0, 3, size).astype(np.int64)


def dataset_of(images, labels):
    return tf.data.Dataset.from_tensors((images, labels))


def shared_weights(model):
    trainable, non_trainable, _, _ = client_work.ModelParts(model).split(model)
    return collections.OrderedDict(
        trainable=[v.numpy() for v in trainable], non_trainable=[v.numpy() for v in non_trainable]
    )


def test_module_does_not_import_tff():
    tree = ast.parse(open(client_work.__file__).read())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported and not [name for name in imported if name.startswith("tensorflow_federated")]


def test_fedkl_step_keeps_the_key_updates_the_lock_privately_and_sends_the_sgd_delta():
    model = tiny_model()
    global_weights = shared_weights(model)
    key = tfkl.generate_key(KEY_DIM, seed=7)
    own_lock = [0.5 * v.numpy() + 0.01 for v in client_work.ModelParts(model).split(model)[3]]
    state = client_work.initial_client_state(model, key, own_lock, persist_optimizer_state=True, keep_statistics=False)
    images, labels = batch()

    # By hand: the gradient at the client's key and lock, one SGD step.
    reference = tiny_model()
    shared_t, shared_n, _, lock_vars = client_work.ModelParts(reference).split(reference)
    tfkl.set_key(reference, key)
    for variable, value in zip(lock_vars, own_lock):
        variable.assign(value)
    statistics_before = [v.numpy() for v in shared_n]
    with tf.GradientTape() as tape:
        logits = reference(images, training=True)
        loss = training.classification_loss()(labels, logits)
    gradients = dict(
        zip([id(v) for v in reference.trainable_variables], tape.gradient(loss, reference.trainable_variables))
    )

    output = client_work.client_update(
        tiny_model(),
        plain_sgd(),
        global_weights,
        LEARNING_RATE,
        dataset_of(images, labels),
        state,
        weight_by_examples=True,
    )
    for sent, variable in zip(output.update["trainable"], shared_t):
        np.testing.assert_allclose(sent, -LEARNING_RATE * gradients[id(variable)].numpy(), rtol=1e-5, atol=1e-7)
    for sent, variable, before in zip(output.update["non_trainable"], shared_n, statistics_before):
        np.testing.assert_allclose(sent, variable.numpy() - before, rtol=1e-5, atol=1e-7)
    new_state = output.client_state
    np.testing.assert_array_equal(new_state["key"][0], key)
    for new, old, variable in zip(new_state["lock"], own_lock, lock_vars):
        np.testing.assert_allclose(new, old - LEARNING_RATE * gradients[id(variable)].numpy(), rtol=1e-5, atol=1e-7)
    assert not np.allclose(new_state["lock"][0], own_lock[0])
    for buffer, variable in zip(new_state["optimizer"], reference.trainable_variables):
        np.testing.assert_allclose(buffer, gradients[id(variable)].numpy(), rtol=1e-5, atol=1e-7)
    # Nothing private is sent: the update has exactly the shared variables' shapes.
    assert [u.shape for u in output.update["trainable"]] == [tuple(v.shape) for v in shared_t]
    assert float(output.weight) == 5
    correct = int(np.sum(np.argmax(logits, axis=-1) == labels))
    assert {k: int(v) for k, v in output.metrics.items() if k != "loss_sum"} == dict(
        correct=correct, num_examples=5, clients_accepted=1, clients_rejected=0
    )
    np.testing.assert_allclose(output.metrics["loss_sum"], 5 * loss.numpy(), rtol=1e-5)
    assert (int(output.report["num_steps"]), bool(output.report["accepted"])) == (1, True)


def test_non_finite_client_is_rejected_and_keeps_its_state():
    model = tiny_model()
    state = client_work.initial_client_state(
        model, tfkl.generate_key(KEY_DIM, seed=1), persist_optimizer_state=True, keep_statistics=False
    )
    images, labels = batch()
    images[0, 0, 0, 0] = np.nan
    output = client_work.client_update(
        tiny_model(),
        plain_sgd(),
        shared_weights(model),
        LEARNING_RATE,
        dataset_of(images, labels),
        state,
        weight_by_examples=True,
    )
    assert float(output.weight) == 0 and not bool(output.report["accepted"])
    assert all(not np.any(u) for u in tf.nest.flatten(output.update))
    for new, old in zip(tf.nest.flatten(output.client_state), tf.nest.flatten(state)):
        np.testing.assert_array_equal(new, old)
    assert (int(output.metrics["clients_rejected"]), int(output.metrics["num_examples"])) == (1, 0)
    assert float(output.metrics["loss_sum"]) == 0


def test_fedavg_client_with_local_statistics_fresh_optimizer_and_uniform_weight():
    model = tiny_model(locked=False)
    state = client_work.initial_client_state(model, persist_optimizer_state=False, keep_statistics=True)
    assert not state["key"] and not state["lock"] and not state["optimizer"] and len(state["statistics"]) == 2
    output = client_work.client_update(
        tiny_model(locked=False),
        plain_sgd(),
        shared_weights(model),
        LEARNING_RATE,
        dataset_of(*batch(size=7)),
        state,
        weight_by_examples=False,
    )
    assert float(output.weight) == 1 and not output.update["non_trainable"] and not output.client_state["optimizer"]
    assert not np.allclose(output.client_state["statistics"][0], state["statistics"][0])  # kept privately
    empty = dataset_of(*batch()).take(0)
    output = client_work.client_update(
        tiny_model(locked=False),
        plain_sgd(),
        shared_weights(model),
        LEARNING_RATE,
        empty,
        state,
        weight_by_examples=False,
    )
    assert float(output.weight) == 0 and int(output.report["num_steps"]) == 0


def test_initial_client_state_checks_key_and_lock():
    with pytest.raises(ValueError, match="needs a key"):
        client_work.initial_client_state(tiny_model(), persist_optimizer_state=True, keep_statistics=False)
    with pytest.raises(ValueError, match="has no key"):
        client_work.initial_client_state(
            tiny_model(locked=False), tfkl.generate_key(KEY_DIM), persist_optimizer_state=True, keep_statistics=False
        )
    with pytest.raises(ValueError, match="do not fit"):
        client_work.initial_client_state(
            tiny_model(), tfkl.generate_key(KEY_DIM), [np.zeros(3)], persist_optimizer_state=True, keep_statistics=False
        )


def test_server_update_applies_the_optimizer_to_the_mean_update():
    model = tiny_model()
    server_optimizer = optimizers.TorchSGD(0.5, momentum=0.0, nesterov=False, weight_decay=0.0)
    state = client_work.initial_server_state(model, server_optimizer)
    assert int(state["round_num"]) == 0
    mean = collections.OrderedDict(
        trainable=[tf.ones_like(w) for w in state["trainable"]],
        non_trainable=[tf.fill(w.shape, 0.25) for w in state["non_trainable"]],
    )
    new = client_work.server_update(server_optimizer, state, mean)
    assert int(new["round_num"]) == 1
    for after, before in zip(new["trainable"], state["trainable"]):
        np.testing.assert_allclose(after, before.numpy() + 0.5, rtol=1e-6)  # gradient = -mean update
    for after, before in zip(new["non_trainable"], state["non_trainable"]):
        np.testing.assert_allclose(after, before.numpy() + 0.25, rtol=1e-6)
    kept_local = client_work.server_update(
        server_optimizer, state, collections.OrderedDict(trainable=mean["trainable"], non_trainable=[])
    )
    for after, before in zip(kept_local["non_trainable"], state["non_trainable"]):
        np.testing.assert_array_equal(after, before)


def test_round_metrics_average_over_accepted_examples():
    sums = collections.OrderedDict(
        loss_sum=tf.constant(6.0),
        correct=tf.constant(3, tf.int64),
        num_examples=tf.constant(4, tf.int64),
        clients_accepted=tf.constant(2, tf.int64),
        clients_rejected=tf.constant(1, tf.int64),
    )
    metrics = client_work.round_metrics(sums)
    assert (float(metrics["loss"]), float(metrics["accuracy"])) == (1.5, 0.75)
    assert (int(metrics["clients_accepted"]), int(metrics["clients_rejected"])) == (2, 1)
    nobody = client_work.round_metrics(
        collections.OrderedDict(
            sums, loss_sum=tf.constant(0.0), correct=tf.constant(0, tf.int64), num_examples=tf.constant(0, tf.int64)
        )
    )
    assert (float(nobody["loss"]), float(nobody["accuracy"])) == (0.0, 0.0)


def test_uniform_divergence_is_zero_only_for_uniform_predictions():
    assert abs(float(client_work.uniform_divergence(tf.zeros((4, 10))))) < 1e-6
    assert float(client_work.uniform_divergence(tf.constant([[5.0, 0.0, 0.0]]))) > 0.5


@pytest.mark.parametrize("distribution", ["uniform", "gaussian", "rademacher"])
def test_throwaway_keys_follow_the_distribution_and_the_seed(distribution):
    seed = tf.constant([3, 4], tf.int64)
    key = client_work.throwaway_key(4000, seed, distribution).numpy()
    np.testing.assert_array_equal(key, client_work.throwaway_key(4000, seed, distribution).numpy())
    assert not np.array_equal(key, client_work.throwaway_key(4000, seed + 1, distribution).numpy())
    if distribution == "uniform":
        assert key.min() >= 0 and key.max() < 1
    else:
        assert abs(key.mean()) < 0.1 and abs(key.var() - 1) < 0.1
    if distribution == "rademacher":
        assert set(np.unique(key)) == {-1.0, 1.0}


def test_random_key_penalty_changes_the_update_only_when_positive():
    model = tiny_model()
    global_weights = shared_weights(model)
    state = client_work.initial_client_state(
        model, tfkl.generate_key(KEY_DIM, seed=7), persist_optimizer_state=True, keep_statistics=False
    )
    images, labels = batch()

    def update(**options):
        trained = tiny_model()
        output = client_work.client_update(
            trained,
            plain_sgd(),
            global_weights,
            LEARNING_RATE,
            dataset_of(images, labels),
            state,
            weight_by_examples=True,
            **options,
        )
        return output, trained

    plain, _ = update()
    zero, _ = update(random_key_penalty=0.0, key_distribution="gaussian")
    penalized, trained = update(random_key_penalty=1.0, key_distribution="gaussian")
    for a, b in zip(tf.nest.flatten(plain), tf.nest.flatten(zero)):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(plain.update["trainable"][0], penalized.update["trainable"][0])
    assert not np.allclose(plain.client_state["lock"][0], penalized.client_state["lock"][0])
    # The reported loss is the classification loss; the key and the moving statistics are put back
    # after the extra pass (one batch: the statistics of the main pass alone, as without the penalty).
    np.testing.assert_allclose(plain.metrics["loss_sum"], penalized.metrics["loss_sum"], rtol=1e-6)
    np.testing.assert_array_equal(penalized.client_state["key"][0], state["key"][0])
    np.testing.assert_array_equal(tfkl.get_key(trained), state["key"][0])
    for a, b in zip(plain.update["non_trainable"], penalized.update["non_trainable"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="needs a model with a key"):
        client_work.client_update(
            tiny_model(locked=False),
            plain_sgd(),
            shared_weights(tiny_model(locked=False)),
            LEARNING_RATE,
            dataset_of(images, labels),
            client_work.initial_client_state(
                tiny_model(locked=False), persist_optimizer_state=False, keep_statistics=False
            ),
            weight_by_examples=True,
            random_key_penalty=1.0,
        )


def noisy_round(global_weights, key, images, labels, round_noise=0.5):
    """(ClientOutput, the trained model) of one plain SGD step of a client whose lock has `round_noise`."""
    trained = tiny_model(round_noise=round_noise)
    state = client_work.initial_client_state(trained, key, persist_optimizer_state=False, keep_statistics=False)
    output = client_work.client_update(
        trained, plain_sgd(), global_weights, LEARNING_RATE, dataset_of(images, labels), state, weight_by_examples=True
    )
    return output, trained


def test_round_noise_is_drawn_per_key_and_round_trains_the_step_and_never_leaves_the_client():
    global_weights, images, labels = shared_weights(tiny_model()), *batch()
    key = tfkl.generate_key(KEY_DIM, seed=7)
    output, trained = noisy_round(global_weights, key, images, labels)
    lock = tfkl.private.lock_layers(trained)[0]
    noise = lock.noise.numpy()
    assert noise.shape == (2, 3) and np.all(noise != 0)  # (scale, shift) x channels
    again, again_model = noisy_round(global_weights, key, images, labels)
    np.testing.assert_array_equal(tfkl.private.lock_layers(again_model)[0].noise.numpy(), noise)
    for a, b in zip(tf.nest.flatten(output), tf.nest.flatten(again)):
        np.testing.assert_array_equal(a, b)
    next_round = collections.OrderedDict(
        trainable=[w + 0.01 for w in global_weights["trainable"]], non_trainable=global_weights["non_trainable"]
    )
    other_round = tfkl.private.lock_layers(noisy_round(next_round, key, images, labels)[1])[0].noise.numpy()
    other_key = tfkl.private.lock_layers(noisy_round(global_weights, 1 - key, images, labels)[1])[0].noise.numpy()
    assert not np.allclose(other_round, noise) and not np.allclose(other_key, noise)
    # The step is SGD on the noisy lock: gamma * (1 + noise[0]), beta + gamma * noise[1].
    manual = tiny_model(round_noise=0.5)
    manual_lock = tfkl.private.lock_layers(manual)[0]
    manual_lock.noise.assign(noise)
    manual_lock.key.assign(key)
    with tf.GradientTape() as tape:
        loss = training.classification_loss()(labels, manual(images, training=True))
    shared = client_work.ModelParts(manual).split(manual)[0]
    for delta, gradient in zip(output.update["trainable"], tape.gradient(loss, shared)):
        np.testing.assert_allclose(delta, -LEARNING_RATE * gradient.numpy(), rtol=1e-4, atol=1e-6)
    noiseless, _ = noisy_round(global_weights, key, images, labels, round_noise=0.0)
    assert not np.allclose(noiseless.update["trainable"][0], output.update["trainable"][0])
    # Inference never applies it, and the noise is in neither the state nor the update.
    with_noise = manual(images, training=False)
    manual_lock.noise.assign(tf.zeros_like(manual_lock.noise))
    np.testing.assert_array_equal(with_noise, manual(images, training=False))
    assert [a.shape for a in tf.nest.flatten(output.client_state)] == [
        a.shape for a in tf.nest.flatten(noiseless.client_state)
    ]
    assert [a.shape for a in tf.nest.flatten(output.update)] == [a.shape for a in tf.nest.flatten(noiseless.update)]


def test_reject_non_finite_passes_a_finite_client_and_zeroes_a_diverged_one():
    update = collections.OrderedDict(trainable=[np.ones(3, np.float32)], non_trainable=[])
    old = collections.OrderedDict(lock=[np.zeros(2, np.float32)])
    new = collections.OrderedDict(lock=[np.full(2, 2.0, np.float32)])
    sent, kept, finite = client_work.reject_non_finite(update, new, old, tf.constant(1.5))
    assert bool(finite)
    np.testing.assert_array_equal(sent["trainable"][0], update["trainable"][0])
    np.testing.assert_array_equal(kept["lock"][0], new["lock"][0])
    for bad_update, bad_state, loss_sum in (
        ({**update, "trainable": [np.array([1.0, np.nan, 1.0], np.float32)]}, new, 1.5),
        (update, collections.OrderedDict(lock=[np.array([np.inf, 2.0], np.float32)]), 1.5),
        (update, new, np.inf),
    ):
        sent, kept, finite = client_work.reject_non_finite(bad_update, bad_state, old, tf.constant(loss_sum))
        assert not bool(finite)
        np.testing.assert_array_equal(sent["trainable"][0], np.zeros(3, np.float32))
        np.testing.assert_array_equal(kept["lock"][0], old["lock"][0])


@pytest.mark.parametrize("in_graph", [False, True])
def test_random_key_divergence_scores_a_fresh_key_and_leaves_the_model_as_it_came(in_graph):
    model = tiny_model()
    _, statistics_vars, key_vars, _ = client_work.ModelParts(model).split(model)
    own_key = key_vars[0].numpy()
    fresh_key = tfkl.generate_key(KEY_DIM, seed=3)
    images, _ = batch()
    model(images, training=True)  # the main pass: moves the statistics
    statistics = [v.numpy() for v in statistics_vars]

    reference = tiny_model()
    tfkl.set_key(reference, fresh_key)
    for variable, value in zip(client_work.ModelParts(reference).split(reference)[1], statistics):
        variable.assign(value)
    expected = client_work.uniform_divergence(reference(images, training=True))

    divergence = functools.partial(
        client_work.random_key_divergence,
        model,
        images,
        fresh_key,
        key_vars,
        statistics_vars,
        tf.constant(own_key),
    )
    value = tf.function(divergence)() if in_graph else divergence()
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    np.testing.assert_array_equal(key_vars[0].numpy(), own_key)
    for variable, before in zip(statistics_vars, statistics):
        np.testing.assert_array_equal(variable.numpy(), before)
