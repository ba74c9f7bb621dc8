import numpy as np
import pytest
import tensorflow as tf

import tfkl
from tfkl import models


def _weights_by_name(model):
    return {w.name: w.numpy() for w in model.weights}


def test_secure_inserts_lock_and_copies_untouched_weights():
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inputs)
    x = tf.keras.layers.Conv2D(5, 3, name="c2")(x)
    x = tf.keras.layers.BatchNormalization(name="bn2")(x)
    x = tf.keras.layers.Flatten()(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(2, name="out")(x))
    before = _weights_by_name(model)
    secured = tfkl.secure(model, where="all", key_dim=8)
    names = [layer.name for layer in secured.layers]
    # A fused activation moves after the lock; a following BatchNormalization is replaced by it.
    assert names.index("c1") < names.index("c1_keylock") < names.index("c1_activation")
    assert "bn2_keylock" in names and "bn2" not in names
    assert secured.get_layer("c1").get_config()["activation"] == "linear"
    for layer_name in ("c1", "c2", "out"):
        for a, b in zip(model.get_layer(layer_name).get_weights(), secured.get_layer(layer_name).get_weights()):
            np.testing.assert_array_equal(a, b)
    # The original is untouched and the two models share no variable.
    for name, value in _weights_by_name(model).items():
        np.testing.assert_array_equal(value, before[name])
    assert not {id(v) for v in model.variables} & {id(v) for v in secured.variables}
    assert len(tfkl.lock_layers(secured)) == 2


def test_secure_by_layer_names_and_bad_inputs():
    model = models.build("lenet", (32, 32, 1), 10, lock=False, seed=0)
    secured = tfkl.secure(model, where=["conv2"], key_dim=4)
    assert [layer.name for layer in tfkl.lock_layers(secured)] == ["conv2_keylock"]
    with pytest.raises(ValueError, match="cannot lock"):
        tfkl.secure(model, where=["logits"])
    with pytest.raises(ValueError, match="'first', 'all'"):
        tfkl.secure(model, where="last")

    class Subclassed(tf.keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclassed"):
        tfkl.secure(Subclassed())
    no_conv = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no conv or dense layer"):
        tfkl.secure(no_conv)


def test_secure_sequential_model():
    model = tf.keras.Sequential(
        [tf.keras.Input((6, 6, 1)), tf.keras.layers.Conv2D(3, 3), tf.keras.layers.Flatten(), tf.keras.layers.Dense(2)]
    )
    secured = tfkl.secure(model, key_dim=4)
    assert secured(np.ones((1, 6, 6, 1), np.float32)).shape == (1, 2)


@pytest.mark.parametrize("application", ["MobileNetV2", "ResNet50"])
def test_secure_keras_applications(application):
    model = getattr(tf.keras.applications, application)(weights=None, input_shape=(32, 32, 3), classes=3)
    secured = tfkl.secure(model, key_dim=16)
    (lock,) = tfkl.lock_layers(secured)
    assert lock.name.endswith("_keylock")
    assert len(secured.layers) == len(model.layers)  # the first conv's BatchNormalization was replaced
    x = np.random.default_rng(0).random((2, 32, 32, 3), np.float32)
    assert secured(x, training=True).shape == (2, 3)
    plain_params = sum(int(np.prod(w.shape)) for w in model.weights)
    assert sum(int(np.prod(w.shape)) for w in tfkl.shared_variables(secured)) < plain_params


@pytest.mark.parametrize(
    "name, shape",
    [
        ("lenet", (32, 32, 3)),
        ("resnet20", (32, 32, 3)),
        ("resnet32", (32, 32, 1)),
        ("resnet18", (64, 64, 3)),
        ("resnet34", (32, 32, 3)),
        ("vgg16", (32, 32, 3)),
    ],
)
def test_zoo_backbone_is_identical_with_and_without_lock(name, shape):
    plain = models.build(name, shape, 7, lock=False, seed=3)
    locked = models.build(name, shape, 7, lock=True, seed=3, key_dim=16)
    (lock,) = tfkl.lock_layers(locked)
    plain_layers = {layer.name: layer for layer in plain.layers}
    locked_layers = {layer.name: layer for layer in locked.layers}
    # The only differences: the lock block, and the BatchNormalization it takes the place of.
    replaced = {
        name
        for name in [lock.name[: -len("_keylock")]]
        if isinstance(plain_layers.get(name), tf.keras.layers.BatchNormalization)
    }
    assert set(locked_layers) - set(plain_layers) == {lock.name}
    assert set(plain_layers) - set(locked_layers) == replaced
    for layer_name in set(plain_layers) & set(locked_layers):
        for a, b in zip(plain_layers[layer_name].get_weights(), locked_layers[layer_name].get_weights()):
            np.testing.assert_array_equal(a, b)
    out = locked(np.zeros((1,) + shape, np.float32), training=True)
    assert out.shape == (1, 7)


def test_lenet_matches_the_dlg_architecture():
    model = models.build("lenet", (32, 32, 3), 100, lock=False, init="dlg", seed=0)
    assert [model.get_layer(f"conv{i}").output.shape[1] for i in (1, 2, 3)] == [16, 8, 8]
    assert model.get_layer("logits").kernel.shape == (768, 100)
    for weight in model.weights:
        assert weight.numpy().min() >= -0.5 and weight.numpy().max() <= 0.5
    kernels = [model.get_layer(f"conv{i}").kernel.numpy() for i in (2, 3)]
    assert not np.array_equal(kernels[0], kernels[1])  # per-layer seeds


def test_pytorch_init_bounds_and_explicit_padding():
    model = models.build("resnet18", (64, 64, 3), 10, lock=False, seed=0)
    kernel = model.get_layer("conv1").kernel.numpy()
    bound = 1 / np.sqrt(7 * 7 * 3)
    assert kernel.max() <= bound and kernel.min() >= -bound and kernel.max() > 0.9 * bound
    # 7x7/2 with symmetric padding 3, as PyTorch: 64 -> 32.
    assert model.get_layer("conv1").output.shape[1:3] == (32, 32)
    with pytest.raises(ValueError, match="unknown model"):
        models.build("alexnet")
