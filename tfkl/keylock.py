"""The KeyLock Keras layer: a normalisation whose affine parameters come from a private key."""

import math

import numpy as np
import tensorflow as tf

from tfkl import keys as keys_lib

NORMALIZATIONS = ("batch", "group", "layer", "none")
ACTIVATIONS = ("relu", "sigmoid")
PRIVATE_WEIGHT_NAMES = ("key", "scale_kernel", "scale_bias", "shift_kernel", "shift_bias")


@tf.keras.utils.register_keras_serializable(package="tfkl")
class TorchLinearUniform(tf.keras.initializers.Initializer):
    """PyTorch's default Linear/Conv initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    `fan_in` is given explicitly so that biases get the bound of their layer's kernel.
    """

    def __init__(self, fan_in, seed=None):
        self.fan_in = int(fan_in)
        self.seed = seed

    @property
    def bound(self):
        return 1.0 / math.sqrt(self.fan_in)

    def __call__(self, shape, dtype=None, **kwargs):
        bound = self.bound
        return tf.keras.initializers.RandomUniform(-bound, bound, seed=self.seed)(
            shape, dtype=dtype or tf.float32
        )

    def get_config(self):
        return {"fan_in": self.fan_in, "seed": self.seed}


def lock_affine(key, scale_kernel, scale_bias, shift_kernel, shift_bias, activation="relu"):
    """The lock's (gamma, beta) for `key`: `act(key @ kernel + bias)` for the scale and the shift.

    Both come from one projection of the key onto the two kernels side by side. Differentiable in
    every argument (the attacks optimise the key or the lock weights through it).
    """
    act = tf.nn.relu if activation == "relu" else tf.sigmoid
    kernel = tf.concat([scale_kernel, shift_kernel], axis=1)
    bias = tf.concat([scale_bias, shift_bias], axis=0)
    projection = act(tf.nn.bias_add(tf.matmul(tf.reshape(key, [1, -1]), kernel), bias))
    gamma, beta = tf.split(tf.reshape(projection, [-1]), 2)
    return gamma, beta


@tf.keras.utils.register_keras_serializable(package="tfkl")
class KeyLock(tf.keras.layers.Layer):
    """Key-lock block of FedKL: `gamma * normalize(x) + beta`.

    `gamma = act(key @ scale_kernel + scale_bias)` and `beta = act(key @ shift_kernel + shift_bias)`,
    with one secret `key` for both, broadcast over the batch and spatial axes of channels-last `x`.
    The key (non-trainable) and the four lock weights are private to the client; the
    normalisation's moving statistics (normalization='batch') are shared like any BatchNorm's.

    Args:
      key_dim: length of the secret key (the paper uses 1024).
      activation: 'relu' (paper) or 'sigmoid', applied to gamma and beta.
      normalization: 'batch' (no affine, paper), 'group', 'layer' or 'none'.
      groups: number of groups for normalization='group'; default: the largest divisor of the
        channel count that is at most 32.
      momentum, epsilon: moving-statistics momentum (Keras convention; 0.9 == PyTorch's 0.1) and
        variance epsilon.
      lock_initializer: initialiser of the lock kernels and biases; default PyTorch's Linear default.
      key: optional initial key (array-like of shape (key_dim,)); default a fresh CSPRNG key.
    """

    def __init__(
        self,
        key_dim=1024,
        activation="relu",
        normalization="batch",
        groups=None,
        momentum=0.9,
        epsilon=1e-5,
        lock_initializer=None,
        key=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(key_dim) < 1:
            raise ValueError(f"key_dim must be a positive integer, got {key_dim}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.key_dim = int(key_dim)
        self.activation = activation
        self.normalization = normalization
        self.groups = groups
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.lock_initializer = tf.keras.initializers.get(lock_initializer) if lock_initializer else None
        self._initial_key = None if key is None else keys_lib.validate_key(key, self.key_dim)

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("KeyLock needs a known channel (last) dimension")
        self.channels = int(channels)
        if self.normalization == "group":
            self._num_groups = self._resolve_groups(self.channels)
        initial_key = self._initial_key
        if initial_key is None:
            initial_key = keys_lib.generate_key(self.key_dim)
        self.key = self.add_weight(
            name="key",
            shape=(self.key_dim,),
            initializer=tf.constant_initializer(initial_key),
            trainable=False,
        )
        for index, (name, shape) in enumerate((
                ("scale_kernel", (self.key_dim, self.channels)), ("scale_bias", (self.channels,)),
                ("shift_kernel", (self.key_dim, self.channels)), ("shift_bias", (self.channels,)))):
            setattr(self, name, self.add_weight(name=name, shape=shape, initializer=self._lock_init(index)))
        if self.normalization == "batch":
            self.moving_mean = self.add_weight(
                name="moving_mean", shape=(self.channels,), initializer="zeros", trainable=False)
            self.moving_variance = self.add_weight(
                name="moving_variance", shape=(self.channels,), initializer="ones", trainable=False)
        super().build(input_shape)

    def _lock_init(self, index):
        """The lock weights' initialiser; a seeded one is re-seeded per weight so they differ."""
        if self.lock_initializer is None:
            return TorchLinearUniform(self.key_dim)
        config = self.lock_initializer.get_config()
        if config.get("seed") is not None:
            config["seed"] += index
        return self.lock_initializer.__class__.from_config(config)

    def draw_lock_weights(self, seed=None):
        """Fresh lock weights (scale/shift kernels and biases, numpy) from the layer's uniform lock
        initialiser's distribution, drawn from the CSPRNG (`tfkl.keys.secret_uniform`; a seed only
        for experiments): a client's private starting lock that no server can rebuild."""
        initializer = self.lock_initializer or TorchLinearUniform(self.key_dim)
        if isinstance(initializer, TorchLinearUniform):
            low, high = -initializer.bound, initializer.bound
        elif isinstance(initializer, tf.keras.initializers.RandomUniform):
            low, high = float(initializer.minval), float(initializer.maxval)
        else:
            raise ValueError(f"private lock weights need a uniform lock initialiser, got {type(initializer).__name__}")
        weights = []
        for index, variable in enumerate(self.private_weights[1:]):
            unit = keys_lib.secret_uniform(variable.shape, None if seed is None else list(seed) + [index])
            weights.append((low + (high - low) * unit).astype(np.float32))
        return weights

    def _resolve_groups(self, channels):
        if self.groups is None:
            return max(g for g in range(1, min(channels, 32) + 1) if channels % g == 0)
        if channels % int(self.groups):
            raise ValueError(f"groups={self.groups} does not divide the {channels} channels")
        return int(self.groups)

    @property
    def private_weights(self):
        """The client's secret: the key and the lock weights."""
        return [self.key, self.scale_kernel, self.scale_bias, self.shift_kernel, self.shift_bias]

    def lock_parameters(self, key=None):
        """Returns (gamma, beta), each of shape (channels,), for `key` (default the layer's own)."""
        key = self.key if key is None else tf.convert_to_tensor(key, self.compute_dtype)
        return lock_affine(key, self.scale_kernel, self.scale_bias, self.shift_kernel, self.shift_bias,
                           self.activation)

    def normalize(self, inputs, training=None):
        """The normalisation without affine parameters."""
        if self.normalization == "none":
            return inputs
        if self.normalization == "layer":
            axes = list(range(1, inputs.shape.rank))
            mean, variance = tf.nn.moments(inputs, axes, keepdims=True)
            return (inputs - mean) * tf.math.rsqrt(variance + self.epsilon)
        if self.normalization == "group":
            shape = tf.shape(inputs)
            grouped = tf.reshape(
                inputs, tf.concat([shape[:-1], [self._num_groups, self.channels // self._num_groups]], 0))
            axes = list(range(1, inputs.shape.rank - 1)) + [inputs.shape.rank]
            mean, variance = tf.nn.moments(grouped, axes, keepdims=True)
            grouped = (grouped - mean) * tf.math.rsqrt(variance + self.epsilon)
            return tf.reshape(grouped, shape)
        ones = tf.ones([self.channels])
        return self._batch_normalize(inputs, ones, tf.zeros_like(ones), training)

    def _batch_normalize(self, inputs, scale, offset, training):
        """`scale * batch_normalized(inputs) + offset`, one fused kernel per pass.

        In training the kernel also returns the moved statistics; like PyTorch, they take the
        unbiased batch variance.
        """
        if training is None:
            training = tf.keras.backend.learning_phase()
        features = inputs if inputs.shape.rank == 4 else tf.reshape(inputs, [-1, 1, 1, self.channels])

        def fused(is_training):
            return tf.compat.v1.nn.fused_batch_norm(
                features, scale, offset, self.moving_mean, self.moving_variance, self.epsilon,
                is_training=is_training, exponential_avg_factor=1.0 - self.momentum if is_training else 1.0)

        def train_branch():
            outputs, moving_mean, moving_variance = fused(True)
            self.moving_mean.assign(moving_mean)
            self.moving_variance.assign(moving_variance)
            return outputs

        outputs = tf.__internal__.smart_cond.smart_cond(training, train_branch, lambda: fused(False)[0])
        return outputs if inputs.shape.rank == 4 else tf.reshape(outputs, tf.shape(inputs))

    def call(self, inputs, training=None):
        gamma, beta = self.lock_parameters()
        if self.normalization == "batch":
            return self._batch_normalize(inputs, gamma, beta, training)
        return gamma * self.normalize(inputs, training) + beta

    def get_config(self):
        # The key is a secret: it travels with the weights (client checkpoints), never in the config.
        config = super().get_config()
        config.update(
            key_dim=self.key_dim,
            activation=self.activation,
            normalization=self.normalization,
            groups=self.groups,
            momentum=self.momentum,
            epsilon=self.epsilon,
            lock_initializer=self._serialized_lock_initializer(),
        )
        return config

    def _serialized_lock_initializer(self):
        """The lock initialiser without its seed: a seed in a config that servers may hold would let
        them rebuild the initial lock weights."""
        if self.lock_initializer is None:
            return None
        serialized = tf.keras.initializers.serialize(self.lock_initializer)
        serialized["config"] = {k: v for k, v in serialized["config"].items() if k != "seed"}
        return serialized
