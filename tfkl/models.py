"""Model zoo: the paper's backbones, identical with and without the lock.

Every model is built plain first; `lock=True` passes it through `tfkl.secure(where='first')`, so
the locked model differs from the plain one by the lock block alone (the paper's Table 1 compares
different backbones; we do not). Padding is explicit (ZeroPadding2D + 'valid'): Keras 'same' pads
stride-2 convolutions on one side only, PyTorch symmetrically.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tfkl.keylock import TorchLinearUniform
from tfkl.names import INITS, MODELS
from tfkl.securing import add_affine_normalization, secure

# PyTorch BatchNorm2d defaults (momentum 0.1 there is 0.9 in Keras' convention).
_BN = dict(momentum=0.9, epsilon=1e-5)


class _Builder:
    """Creates conv/dense layers with per-layer seeded initialisers of one scheme."""

    def __init__(self, init, seed, vgg=False):
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init, self.seed, self.vgg = init, seed, vgg
        self._count = 0

    def _seed(self):
        self._count += 1
        return None if self.seed is None else self.seed * 1000 + self._count

    def _initializers(self, fan_in, dense):
        if self.init == "keras":
            return "glorot_uniform", "zeros"
        if self.init == "dlg":
            return (
                tf.keras.initializers.RandomUniform(-0.5, 0.5, seed=self._seed()),
                tf.keras.initializers.RandomUniform(-0.5, 0.5, seed=self._seed()),
            )
        if self.vgg:  # torchvision VGG's own _initialize_weights
            kernel = (
                tf.keras.initializers.RandomNormal(0.0, 0.01, seed=self._seed())
                if dense
                else tf.keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal", seed=self._seed())
            )
            return kernel, "zeros"
        return TorchLinearUniform(fan_in, self._seed()), TorchLinearUniform(fan_in, self._seed())

    def conv(self, x, filters, kernel_size, strides=1, padding=0, use_bias=False, name=None):
        if padding:
            x = tf.keras.layers.ZeroPadding2D(padding, name=f"{name}_pad" if name else None)(x)
        kernel_init, bias_init = self._initializers(kernel_size * kernel_size * x.shape[-1], dense=False)
        return tf.keras.layers.Conv2D(
            filters,
            kernel_size,
            strides,
            "valid",
            use_bias=use_bias,
            kernel_initializer=kernel_init,
            bias_initializer=bias_init,
            name=name,
        )(x)

    def dense(self, x, units, activation=None, name=None):
        kernel_init, bias_init = self._initializers(x.shape[-1], dense=True)
        return tf.keras.layers.Dense(
            units, activation, kernel_initializer=kernel_init, bias_initializer=bias_init, name=name
        )(x)


def _lenet(inputs, num_classes, builder):
    """The DLG LeNet: three 5x5 sigmoid convs (12 channels), one dense layer."""
    x = inputs
    for i, stride in enumerate((2, 2, 1), start=1):
        x = builder.conv(x, 12, 5, stride, padding=2, use_bias=True, name=f"conv{i}")
        x = tf.keras.layers.Activation("sigmoid", name=f"conv{i}_sigmoid")(x)
    x = tf.keras.layers.Flatten(name="flatten")(x)
    return builder.dense(x, num_classes, name="logits")


def _basic_block(x, filters, stride, builder, name):
    shortcut = x
    y = builder.conv(x, filters, 3, stride, padding=1, name=f"{name}_conv1")
    y = tf.keras.layers.BatchNormalization(**_BN, name=f"{name}_bn1")(y)
    y = tf.keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = builder.conv(y, filters, 3, 1, padding=1, name=f"{name}_conv2")
    y = tf.keras.layers.BatchNormalization(**_BN, name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = builder.conv(x, filters, 1, stride, name=f"{name}_proj")
        shortcut = tf.keras.layers.BatchNormalization(**_BN, name=f"{name}_proj_bn")(shortcut)
    y = tf.keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return tf.keras.layers.ReLU(name=f"{name}_out")(y)


def _resnet(inputs, num_classes, builder, stages, stem):
    """ResNet with BasicBlocks and 1x1-conv shortcuts (the paper's KL variants)."""
    if stem == "cifar":
        x = builder.conv(inputs, stages[0][0], 3, 1, padding=1, name="conv1")
    else:  # ImageNet-style 7x7/2 stem; the paper's KL ResNet-18/34 has no max-pool after it
        x = builder.conv(inputs, stages[0][0], 7, 2, padding=3, name="conv1")
    x = tf.keras.layers.BatchNormalization(**_BN, name="bn1")(x)
    x = tf.keras.layers.ReLU(name="relu1")(x)
    for s, (filters, blocks, stride) in enumerate(stages, start=1):
        for b in range(blocks):
            x = _basic_block(x, filters, stride if b == 0 else 1, builder, name=f"stage{s}_block{b + 1}")
    x = tf.keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    return builder.dense(x, num_classes, name="logits")


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16(inputs, num_classes, builder):
    """VGG-16 with BatchNorm (the paper's KL variant); classifier on the flattened features."""
    x, conv = inputs, 0
    for item in _VGG16:
        if item == "M":
            x = tf.keras.layers.MaxPooling2D(2, name=f"pool{conv}")(x)
            continue
        conv += 1
        x = builder.conv(x, item, 3, 1, padding=1, use_bias=True, name=f"conv{conv}")
        x = tf.keras.layers.BatchNormalization(**_BN, name=f"bn{conv}")(x)
        x = tf.keras.layers.ReLU(name=f"relu{conv}")(x)
    x = tf.keras.layers.Flatten(name="flatten")(x)
    for i in (1, 2):
        x = builder.dense(x, 4096, "relu", name=f"fc{i}")
        x = tf.keras.layers.Dropout(0.5, name=f"dropout{i}")(x)
    return builder.dense(x, num_classes, name="logits")


def _cifar_stages(blocks):
    return ((16, blocks, 1), (32, blocks, 2), (64, blocks, 2))


_ARCHITECTURES = {
    "lenet": _lenet,
    "resnet20": lambda i, c, b: _resnet(i, c, b, _cifar_stages(3), "cifar"),
    "resnet32": lambda i, c, b: _resnet(i, c, b, _cifar_stages(5), "cifar"),
    "resnet18": lambda i, c, b: _resnet(i, c, b, ((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)), "imagenet"),
    "resnet34": lambda i, c, b: _resnet(i, c, b, ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), "imagenet"),
    "vgg16": _vgg16,
}
_SMALL_INPUT_NAMES = ("lenet", "resnet20", "resnet32")  # the paper's models, on 32x32 inputs


def input_shape(name, dataset):
    """The input shape of zoo model `name` on a `tfkl.data` data set: 32x32 for LeNet/ResNet-20/32 (the
    paper's), 224x224 for the larger models; the channels follow the data (grey stays grey)."""
    size = 32 if name in _SMALL_INPUT_NAMES else 224
    return (size, size, int(dataset.x_train.shape[-1]))


def build(
    name: str,
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    lock: bool = True,
    init: str = "pytorch",
    seed: int | None = None,
    key_dim: int = 1024,
    activation: str = "relu",
    normalization: str = "batch",
    key: np.ndarray | None = None,
    where: str | int | Sequence[str] = "first",
    control: bool = False,
    affine: str = "channel",
    kernel: str = "full",
    round_noise: float = 0.0,
) -> tf.keras.Model:
    """Builds a zoo model; with `lock=True` its first conv layer (or those `where` names) carries a KeyLock block.

    Args:
      name: one of MODELS.
      input_shape: (height, width, channels) of the inputs.
      num_classes: number of output logits (the model outputs logits, no softmax).
      lock: whether to add the key-lock block after the first conv layer.
      init: 'pytorch' (PyTorch's default initialisers, the paper's), 'dlg' (U(-0.5, 0.5) on every
        weight and bias, as DLG attacks use) or 'keras' (Keras defaults).
      seed: seeds every initialiser (distinct per layer) for reproducible experiments.
      key_dim, activation, normalization, key, affine, kernel, round_noise: the KeyLock's options (see
        `tfkl.KeyLock`).
      where: the layers to lock, as `tfkl.secure` takes it: 'first' (the paper's), 'all', a number
        of layers or names.
      control: with `lock=False`, the FedAvg control instead of the plain backbone: a
        `tfkl.AffineNorm` (the lock's `normalization` with a learned affine, no key) where the lock
        blocks would be (`tfkl.add_affine_normalization`).
    """
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape must be (height, width, channels) of positive sizes, got {input_shape!r}")
    builder = _Builder(init, seed, vgg=(name == "vgg16"))
    inputs = tf.keras.Input(shape=tuple(input_shape), name="images")
    model = tf.keras.Model(inputs, _ARCHITECTURES[name](inputs, num_classes, builder), name=name)
    if control and lock:
        raise ValueError("control=True replaces the lock blocks: it needs lock=False")
    if control:
        return add_affine_normalization(model, where, normalization, name=f"{name}_norm")
    if not lock:
        return model
    lock_initializer = None
    if init == "dlg":
        lock_initializer = tf.keras.initializers.RandomUniform(-0.5, 0.5, seed=builder._seed())
    elif init == "pytorch" and seed is not None:
        lock_initializer = TorchLinearUniform(key_dim, builder._seed())
    return secure(
        model,
        where,
        key_dim=key_dim,
        activation=activation,
        normalization=normalization,
        key=key,
        lock_initializer=lock_initializer,
        name=f"{name}_locked",
        affine=affine,
        kernel=kernel,
        round_noise=round_noise,
    )
