import os
import stat

import numpy as np
import pytest
import tensorflow as tf

from attacks import model as attacks_model
import tfkl
from tfkl.keylock import KeyLock, keylock_apply


def _lock_model(normalization="batch", key_dim=8, channels=4, activation="relu"):
    inputs = tf.keras.Input((5, 5, 3))
    x = tf.keras.layers.Conv2D(channels, 3, name="conv")(inputs)
    x = KeyLock(key_dim, activation, normalization, name="lock")(x)
    x = tf.keras.layers.Flatten()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="out")(x))


def test_keylock_computes_gamma_times_batch_normalized_plus_beta():
    layer = KeyLock(key_dim=6, key=tfkl.generate_key(6, seed=1))
    x = np.random.default_rng(0).normal(size=(4, 3, 3, 5)).astype(np.float32)
    out = layer(x, training=True).numpy()
    key = layer.key.numpy()
    gamma = np.maximum(key @ layer.scale_kernel.numpy() + layer.scale_bias.numpy(), 0)
    beta = np.maximum(key @ layer.shift_kernel.numpy() + layer.shift_bias.numpy(), 0)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(out, gamma * (x - mean) / np.sqrt(var + 1e-5) + beta, rtol=1e-4, atol=1e-5)
    # Moving statistics moved towards the batch statistics (PyTorch keeps the unbiased variance).
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.9 + 0.1 * var * 36 / 35, rtol=1e-4)


@pytest.mark.parametrize("normalization", ["group", "layer", "none"])
def test_keylock_other_normalizations_have_no_shared_statistics(normalization):
    layer = KeyLock(key_dim=4, normalization=normalization, activation="sigmoid")
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 6)).astype(np.float32)
    out = layer(x, training=True).numpy()
    assert out.shape == x.shape and np.all(np.isfinite(out))
    assert {w.name.split("/")[-1].split(":")[0] for w in layer.weights} == set(tfkl.keylock.PRIVATE_WEIGHT_NAMES)


def _randomized_lock(shape, activation, key_dim=16):
    """A built KeyLock with random lock weights and moving statistics away from their defaults."""
    layer = KeyLock(key_dim, activation, key=tfkl.generate_key(key_dim, seed=2))
    layer.build(shape)
    rng = np.random.default_rng(3)
    for variable in layer.weights[1:]:
        value = rng.normal(size=variable.shape).astype(np.float32) * (0.3 if "kernel" in variable.name else 1.0)
        variable.assign(np.abs(value) + 0.5 if "variance" in variable.name else value)
    return layer


def _reference_lock(layer, x, training):
    """The paper's block op by op (the layer fuses it): gamma * batch_normalize(x) + beta."""
    act = tf.nn.relu if layer.activation == "relu" else tf.sigmoid
    gamma = act(tf.linalg.matvec(layer.scale_kernel, layer.key, transpose_a=True) + layer.scale_bias)
    beta = act(tf.linalg.matvec(layer.shift_kernel, layer.key, transpose_a=True) + layer.shift_bias)
    axes = list(range(x.shape.rank - 1))
    mean, variance = tf.nn.moments(x, axes) if training else (layer.moving_mean, layer.moving_variance)
    return gamma * tf.nn.batch_normalization(x, mean, variance, None, None, layer.epsilon) + beta


def _gradients_to_second_order(forward, x, variables):
    """(output, gradients of a loss, gradients of the gradients' squared norm) w.r.t. [x] + variables."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward(x)
            loss = tf.reduce_sum(tf.sin(y) * tf.range(1.0, 1.0 + y.shape[-1]))
        gradients = tape.gradient(loss, [x] + variables)
        norm = tf.add_n([tf.reduce_sum(g * g) for g in gradients])
    return y, gradients, outer.gradient(norm, [x] + variables)


def _assert_close(actual, expected, tolerance):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert np.linalg.norm(actual - expected) <= tolerance * np.linalg.norm(expected) + 1e-6


@pytest.mark.parametrize("shape", [(8, 5, 5, 6), (1, 4, 4, 6), (7, 6), (3, 4, 6)])
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_batch_lock_matches_the_op_by_op_block(shape, activation, training):
    layer = _randomized_lock(shape, activation)
    x = tf.constant(np.random.default_rng(4).normal(size=shape).astype(np.float32) * 2 + 0.5)
    statistics = [layer.moving_mean.numpy(), layer.moving_variance.numpy()]
    expected = _gradients_to_second_order(lambda t: _reference_lock(layer, t, training), x, layer.trainable_weights)
    actual = _gradients_to_second_order(lambda t: layer(t, training=training), x, layer.trainable_weights)
    # Relative, float32: the fused op sums in another order; on some CPUs first-order gradients differ by 1.1e-5.
    for order, tolerance in ((0, 1e-5), (1, 1e-4), (2, 1e-4)):
        for got, want in zip(tf.nest.flatten(actual[order]), tf.nest.flatten(expected[order])):
            _assert_close(got, want, tolerance)
    if training:  # moved towards the batch statistics, with PyTorch's unbiased variance
        values = x.numpy().reshape(-1, shape[-1])
        count = values.shape[0]
        statistics = [
            0.9 * statistics[0] + 0.1 * values.mean(0),
            0.9 * statistics[1] + 0.1 * values.var(0) * count / (count - 1),
        ]
    _assert_close(layer.moving_mean.numpy(), statistics[0], 1e-6)
    _assert_close(layer.moving_variance.numpy(), statistics[1], 1e-6)


def test_a_frozen_lock_uses_and_keeps_its_moving_statistics_in_training():
    """As Keras' BatchNormalization: trainable=False means inference mode, whatever `training` says."""
    layer = _randomized_lock((8, 5, 5, 6), "relu")
    x = tf.constant(np.random.default_rng(6).normal(size=(8, 5, 5, 6)).astype(np.float32) * 2 + 0.5)
    statistics = [layer.moving_mean.numpy(), layer.moving_variance.numpy()]
    inference = layer(x, training=False).numpy()
    layer.trainable = False
    np.testing.assert_array_equal(layer(x, training=True).numpy(), inference)
    np.testing.assert_array_equal(tf.function(lambda t: layer(t, training=True))(x).numpy(), inference)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), statistics[0])
    np.testing.assert_array_equal(layer.moving_variance.numpy(), statistics[1])
    layer.trainable = True
    assert np.abs(layer(x, training=True).numpy() - inference).max() > 1e-2
    assert not np.array_equal(layer.moving_mean.numpy(), statistics[0])


def test_input_spec_and_output_shape():
    layer = KeyLock(key_dim=4)
    layer(np.ones((2, 3, 3, 5), np.float32))
    assert layer.compute_output_shape((None, 3, 3, 5)) == (None, 3, 3, 5)
    with pytest.raises(ValueError, match="axis -1"):
        layer(np.ones((2, 3, 3, 4), np.float32))
    with pytest.raises(ValueError, match="ndim"):
        KeyLock(key_dim=4)(np.ones((5,), np.float32))


@pytest.fixture
def mixed_float16():
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    tf.keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("normalization", ["batch", "group", "layer", "none"])
def test_lock_computes_in_float16_with_float32_variables_under_mixed_precision(mixed_float16, normalization):
    layer = KeyLock(key_dim=8, normalization=normalization)
    x = np.random.default_rng(7).normal(size=(4, 5, 5, 6)).astype(np.float32)
    for training in (True, False):
        out = layer(x, training=training)
        assert out.dtype == tf.float16 and np.all(np.isfinite(out.numpy()))
    assert layer.compute_dtype == "float16" and all(v.dtype == tf.float32 for v in layer.weights)
    if normalization == "batch":  # the statistics moved, in float32
        assert np.any(layer.moving_mean.numpy() != 0) and layer.moving_mean.dtype == tf.float32


def test_locked_lenet_trains_a_step_under_mixed_precision(mixed_float16):
    model = tfkl.models.build("lenet", (32, 32, 1), 10, lock=True, seed=0, key_dim=64)
    lock = model.get_layer("conv1_keylock")
    assert lock.compute_dtype == "float16" and lock.scale_kernel.dtype == tf.float32
    kernel_before = lock.scale_kernel.numpy().copy()
    trainer = tfkl.training.Trainer(model, tfkl.optimizers.TorchSGD(0.01))
    x = np.random.default_rng(8).random((8, 32, 32, 1), np.float32)
    loss = trainer.train_step(x, np.arange(8) % 10)
    assert np.isfinite(float(loss))
    assert not np.array_equal(lock.scale_kernel.numpy(), kernel_before)


@pytest.mark.parametrize("normalization", ["batch", "group"])
@pytest.mark.parametrize("training", [True, False])
def test_layer_and_attacker_run_the_same_lock_forward(normalization, training):
    """KeyLock.call and the attacker's functional model both run `keylock_apply`."""
    victim = tfkl.models.build("lenet", (8, 8, 1), 4, lock=True, seed=3, normalization=normalization)
    x = tf.constant(np.random.default_rng(9).random((4, 8, 8, 1), np.float32))
    attacker = attacks_model.AttackerModel(
        attacks_model.ServerView.from_model(victim), "oracle", secret=attacks_model.extract_secret(victim)
    )
    predicted = attacker(attacker.weights, x, attacker.lock_values(), training=training)
    np.testing.assert_allclose(predicted.numpy(), victim(x, training=training).numpy(), rtol=1e-5, atol=1e-6)
    lock = victim.get_layer("conv1_keylock")
    features = tf.keras.Model(victim.input, lock.input)(x)
    statistics = (lock.moving_mean, lock.moving_variance) if normalization == "batch" else None
    applied, _ = keylock_apply(
        features,
        *lock.lock_parameters(),
        statistics,
        normalization=normalization,
        training=training,
        groups=lock.groups,
        epsilon=lock.epsilon,
    )
    np.testing.assert_array_equal(applied.numpy(), lock(features, training=training).numpy())


def test_batch_lock_on_a_single_value_per_channel_keeps_finite_statistics():
    layer = KeyLock(key_dim=4)
    out = layer(np.ones((1, 1, 1, 3), np.float32), training=True)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(layer.moving_variance.numpy()))


@pytest.mark.parametrize("normalization", ["batch", "group", "layer", "none"])
def test_second_order_gradients_through_every_normalization(normalization):
    layer = KeyLock(key_dim=8, activation="sigmoid", normalization=normalization)
    x = tf.constant(np.random.default_rng(5).normal(size=(2, 3, 3, 4)).astype(np.float32))
    _, gradients, second = _gradients_to_second_order(lambda t: layer(t, training=True), x, layer.trainable_weights)
    for g in gradients + second:
        assert g is not None and np.all(np.isfinite(g)) and np.any(g.numpy() != 0)


def test_weights_keep_their_names_and_order():
    """Checkpoints of the layer (by position or by name) stay loadable."""
    layer = _lock_model().get_layer("lock")
    assert [w.name for w in layer.weights] == [
        "lock/scale_kernel:0",
        "lock/scale_bias:0",
        "lock/shift_kernel:0",
        "lock/shift_bias:0",
        "lock/key:0",
        "lock/moving_mean:0",
        "lock/moving_variance:0",
    ]


def test_keylock_dense_features_and_bad_options():
    out = KeyLock(key_dim=3)(np.ones((4, 7), np.float32), training=True)
    assert out.shape == (4, 7)
    with pytest.raises(ValueError, match="normalization"):
        KeyLock(normalization="instance")
    with pytest.raises(ValueError, match="activation"):
        KeyLock(activation="tanh")
    with pytest.raises(ValueError, match="groups=5"):
        KeyLock(normalization="group", groups=5)(np.ones((1, 2, 2, 6), np.float32))


def test_get_config_round_trips_without_the_key():
    layer = KeyLock(key_dim=16, activation="sigmoid", normalization="group", groups=2, momentum=0.8, name="k")
    layer.build((None, 4, 4, 6))
    config = layer.get_config()
    assert "key" not in config
    clone = KeyLock.from_config(config)
    assert clone.get_config() == config


def test_config_holds_no_seed_of_the_lock_initializer():
    seeded = tfkl.keylock.TorchLinearUniform(8, seed=123)
    layer = KeyLock(key_dim=8, lock_initializer=seeded)
    layer.build((None, 3))
    config = layer.get_config()
    assert "seed" not in config["lock_initializer"]["config"]
    assert KeyLock.from_config(config).get_config() == config
    model = tfkl.models.build("lenet", (32, 32, 1), 10, lock=True, seed=5, key_dim=8)
    assert "seed" not in model.get_layer("conv1_keylock").get_config()["lock_initializer"]["config"]


def test_partition_is_exact_and_key_is_not_trainable():
    model = _lock_model()
    private, shared = tfkl.private_variables(model), tfkl.shared_variables(model)
    assert {id(v) for v in private} | {id(v) for v in shared} == {id(v) for v in model.variables}
    assert not {id(v) for v in private} & {id(v) for v in shared}
    assert len(private) == 5 and all("lock" in v.name for v in private)
    assert [v.name for v in shared if "lock" in v.name] == ["lock/moving_mean:0", "lock/moving_variance:0"]
    assert model.get_layer("lock").key not in model.trainable_variables


def test_gradients_reach_lock_weights_and_training_keeps_the_key():
    model = _lock_model(activation="sigmoid")  # ReLU may leave a tiny lock's channels all dead
    key_before = tfkl.get_key(model).copy()
    trainer = tfkl.training.Trainer(model, tfkl.optimizers.TorchSGD(0.1))
    lock = model.get_layer("lock")
    kernel_before = lock.scale_kernel.numpy().copy()
    x = np.random.default_rng(0).random((8, 5, 5, 3), np.float32)
    y = np.arange(8) % 3
    with tf.GradientTape() as tape:
        loss = trainer.loss(y, model(x, training=True))
    gradients = tape.gradient(loss, [lock.scale_kernel, lock.shift_kernel, lock.scale_bias, lock.shift_bias])
    assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in gradients)
    trainer.train_step(x, y)
    np.testing.assert_array_equal(tfkl.get_key(model), key_before)
    assert not np.allclose(lock.scale_kernel.numpy(), kernel_before)


def test_a_random_key_changes_the_output():
    model = _lock_model(key_dim=32)
    x = np.random.default_rng(1).random((4, 5, 5, 3), np.float32)
    before = model(x).numpy()
    tfkl.set_key(model, tfkl.generate_key(32))
    assert np.abs(model(x).numpy() - before).max() > 1e-3


def test_generate_key_is_uniform_and_seedable():
    a, b = tfkl.generate_key(4096), tfkl.generate_key(4096)
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() < 1 and not np.array_equal(a, b)
    assert abs(a.mean() - 0.5) < 0.05
    np.testing.assert_array_equal(tfkl.generate_key(8, seed=3), tfkl.generate_key(8, seed=3))


@pytest.mark.parametrize(
    "distribution, mean, variance",
    [("uniform", 0.5, 1 / 12), ("gaussian", 0.0, 1.0), ("rademacher", 0.0, 1.0)],
)
def test_key_distributions_come_from_the_csprng(distribution, mean, variance, monkeypatch):
    from tfkl import keys

    calls = []
    urandom = os.urandom
    monkeypatch.setattr(keys.os, "urandom", lambda n: calls.append(n) or urandom(n))
    key = tfkl.generate_key(20000, distribution=distribution)
    assert calls and sum(calls) >= 4 * 20000  # every draw from os.urandom, 32 bits (or more) an entry
    assert key.dtype == np.float32 and key.shape == (20000,) and np.all(np.isfinite(key))
    assert abs(key.mean() - mean) < 0.03 and abs(key.var() - variance) < 0.05 * variance + 0.01
    if distribution == "rademacher":
        assert set(np.unique(key)) == {-1.0, 1.0}
    if distribution == "gaussian":
        assert abs(np.mean(key**4) - 3.0) < 0.3  # a normal's fourth moment, not a uniform's (1.8)
    calls.clear()
    seeded = tfkl.generate_key(8, seed=[1, 2], distribution=distribution)
    assert not calls  # a seed (experiments only) bypasses the CSPRNG, and reproduces
    np.testing.assert_array_equal(seeded, tfkl.generate_key(8, seed=[1, 2], distribution=distribution))
    assert not np.array_equal(key[:128], tfkl.generate_key(128, distribution=distribution))  # 2**-128 for ±1


def test_unknown_key_distribution_is_one_clear_error():
    with pytest.raises(tfkl.KeyFormatError, match="key distribution must be one of"):
        tfkl.generate_key(8, distribution="laplace")


def test_affine_norm_is_the_lock_block_with_a_learned_affine():
    from tfkl.keylock import AffineNorm

    x = tf.random.stateless_normal((4, 5, 5, 3), seed=(1, 2))
    norm = AffineNorm(momentum=0.8)
    norm(x, training=True)
    names = [v.name.split("/")[-1] for v in norm.weights]
    assert names == ["gamma:0", "beta:0", "moving_mean:0", "moving_variance:0"]
    assert [v.trainable for v in norm.weights] == [True, True, False, False]
    norm.gamma.assign([1.0, 2.0, 3.0])
    norm.beta.assign([0.5, 0.0, -0.5])
    want, _ = keylock_apply(x, norm.gamma, norm.beta, (norm.moving_mean, norm.moving_variance), training=False)
    np.testing.assert_allclose(norm(x), want, rtol=1e-6)
    clone = AffineNorm.from_config(norm.get_config())
    assert clone.momentum == 0.8 and clone.normalization == "batch"
    model = tfkl.models.build("lenet", (32, 32, 1), 10, lock=False, control=True, seed=0)
    assert not tfkl.lock_layers(model) and [layer.name for layer in model.layers if "norm" in layer.name] == [
        "conv1_norm"
    ]
    with pytest.raises(ValueError, match="needs lock=False"):
        tfkl.models.build("lenet", (32, 32, 1), 10, lock=True, control=True)


@pytest.mark.parametrize(
    "initializer, bound", [(None, 1 / np.sqrt(8)), (tf.keras.initializers.RandomUniform(-0.5, 0.5), 0.5)]
)
def test_private_lock_weights_are_fresh_and_within_the_initialisers_range(initializer, bound):
    layer = KeyLock(key_dim=8, lock_initializer=initializer)
    layer.build((None, 4, 4, 3))
    drawn = tfkl.private.draw_lock_weights(layer)
    assert [w.shape for w in drawn] == [tuple(v.shape) for v in layer.private_weights[1:]]
    assert all(w.dtype == np.float32 and np.abs(w).max() <= bound for w in drawn)
    assert np.abs(drawn[0]).max() > bound / 2  # spread over the range, not squeezed
    others = tfkl.private.draw_lock_weights(layer)
    assert not any(np.array_equal(a, b) for a, b in zip(drawn, others))
    for a, b in zip(
        tfkl.private.draw_lock_weights(layer, seed=[1, 2]), tfkl.private.draw_lock_weights(layer, seed=[1, 2])
    ):
        np.testing.assert_array_equal(a, b)
    model_fns = [v.numpy() for v in layer.private_weights[1:]]
    assert not any(np.array_equal(a, b) for a, b in zip(drawn, model_fns))


def test_private_lock_weights_need_a_uniform_initialiser():
    layer = KeyLock(key_dim=8, lock_initializer="glorot_normal")
    layer.build((None, 4, 4, 3))
    with pytest.raises(ValueError, match="uniform lock initialiser"):
        tfkl.private.draw_lock_weights(layer)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros(7, np.float32), "length 7"),
        (np.zeros((2, 8), np.float32), "vector"),
        (np.array(["a"] * 8), "numeric"),
        (np.full(8, np.nan, np.float32), "NaN"),
    ],
)
def test_bad_keys_are_one_clear_error(bad, message):
    model = _lock_model(key_dim=8)
    with pytest.raises(tfkl.KeyFormatError, match=message):
        tfkl.set_key(model, bad)


def test_key_file_is_owner_only_and_round_trips(tmp_path):
    key = tfkl.generate_key(64)
    path = str(tmp_path / "client.key")
    tfkl.save_key(path, key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    np.testing.assert_array_equal(tfkl.load_key(path, 64), key)
    with pytest.raises(tfkl.KeyFormatError, match="length 64"):
        tfkl.load_key(path, 32)


def test_corrupt_key_files_are_one_clear_error(tmp_path):
    path = tmp_path / "client.key"
    tfkl.save_key(str(path), tfkl.generate_key(16))
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(tfkl.KeyFormatError, match="corrupt"):
        tfkl.load_key(str(path))
    path.write_bytes(b"garbage-garbage-garbage-garbage-garbage-garbage")
    with pytest.raises(tfkl.KeyFormatError, match="not a tfkl key file"):
        tfkl.load_key(str(path))
    path.write_bytes(b"x")
    with pytest.raises(tfkl.KeyFormatError, match="truncated"):
        tfkl.load_key(str(path))
    with pytest.raises(tfkl.KeyFormatError, match="cannot read"):
        tfkl.load_key(str(tmp_path / "missing.key"))


def test_model_saves_and_loads_with_its_key(tmp_path):
    model = _lock_model()
    x = np.random.default_rng(2).random((3, 5, 5, 3), np.float32)
    path = str(tmp_path / "client.keras")
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    np.testing.assert_array_equal(tfkl.get_key(loaded), tfkl.get_key(model))
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_export_without_private_part(tmp_path):
    model = _lock_model(key_dim=16)
    key = tfkl.get_key(model)
    tfkl.export_shared(model, str(tmp_path / "server"))
    with np.load(tmp_path / "server" / "shared.npz") as arrays:
        names = arrays.files
        assert not any("key" in n or "kernel" in n and "lock" in n for n in names)
        assert not any(np.array_equal(arrays[n], key) for n in names)
    assert key.tobytes() not in (tmp_path / "server" / "model.json").read_bytes()
    server = tfkl.load_shared(str(tmp_path / "server"))
    for a, b in zip(tfkl.shared_variables(server), tfkl.shared_variables(model)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert all(not np.any(v.numpy()) for v in tfkl.private_variables(server))
