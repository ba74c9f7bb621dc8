"""The KeyLock Keras layer: a normalisation whose affine parameters come from a private key."""

import math

import numpy as np
import tensorflow as tf

from tfkl import keys as keys_lib
from tfkl.names import LOCK_KERNELS, NORMALIZATIONS

ACTIVATIONS = ("relu", "sigmoid")
AFFINES = ("channel", "spatial")
FULL_LOCK_WEIGHT_NAMES = ("scale_kernel", "scale_bias", "shift_kernel", "shift_bias")
# A compact lock's kernels are gains[i] * W0[i] + outer(lock_key, deltas[i]), W0 drawn from lock_seed, and
# its biases[i] the full form's biases; i = 0 the scale, 1 the shift (see KeyLock).
COMPACT_LOCK_WEIGHT_NAMES = ("lock_seed", "lock_key", "gains", "deltas", "biases")
PRIVATE_WEIGHT_NAMES = ("key",) + FULL_LOCK_WEIGHT_NAMES
SEED_SIZE = 4  # a compact lock's seed: four float32 integers of 24 bits (96 bits)
_SEED_BASE = 2**24
_HALF_PRECISION = (tf.float16, tf.bfloat16)


def draw_lock_seed(seed=None) -> np.ndarray:
    """A compact lock's seed of its initial kernels from the CSPRNG (`tfkl.keys.secret_uniform`; a seed
    only for experiments): SEED_SIZE float32 integers in [0, 2**24), exact in float32 like any weight."""
    return keys_lib.secret_uniform((SEED_SIZE,), seed) * np.float32(_SEED_BASE)


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
        return tf.keras.initializers.RandomUniform(-bound, bound, seed=self.seed)(shape, dtype=dtype or tf.float32)

    def get_config(self):
        return {"fan_in": self.fan_in, "seed": self.seed}


def lock_affine(key, scale_kernel, scale_bias, shift_kernel, shift_bias, activation="relu", shape=None):
    """The lock's (gamma, beta) for `key`: `act(key @ kernel + bias)` for the scale and the shift.

    Both come from one projection of the key onto the two kernels side by side, flat, or reshaped to
    `shape` (a spatial lock's (height, width, channels)). Differentiable in every argument (the
    attacks optimise the key or the lock weights through it).
    """
    act = tf.nn.relu if activation == "relu" else tf.sigmoid
    kernel = tf.concat([scale_kernel, shift_kernel], axis=1)
    bias = tf.concat([scale_bias, shift_bias], axis=0)
    projection = act(tf.nn.bias_add(tf.matmul(tf.reshape(key, [1, -1]), kernel), bias))
    gamma, beta = tf.split(tf.reshape(projection, [-1]), 2)
    if shape is not None:
        gamma, beta = tf.reshape(gamma, shape), tf.reshape(beta, shape)
    return gamma, beta


def _compact_projection(overlap, base, gains, deltas, biases):
    """A compact lock's `key @ kernel + bias` of both kernels, [2, affine size], from `base = key @ W0`
    and `overlap = key . lock_key`: the value `gains * base + overlap * deltas + biases`, the gradient
    in the deltas the projection's and in the gains zero (not None: the optimizer still decays them)."""
    gains = gains[:, None]
    fixed_gains, fixed_deltas = tf.stop_gradient(gains), tf.stop_gradient(deltas)
    return fixed_gains * base + 0.0 * gains + overlap * fixed_deltas + (deltas - fixed_deltas) + biases


def resolve_groups(channels, groups=None):
    """The group count of normalization='group': `groups`, which must divide `channels`, or by
    default the largest divisor of `channels` that is at most 32."""
    if groups is None:
        return max(g for g in range(1, min(channels, 32) + 1) if channels % g == 0)
    if channels % int(groups):
        raise ValueError(f"groups={groups} does not divide the {channels} channels")
    return int(groups)


def keylock_apply(
    inputs,
    gamma,
    beta,
    statistics=None,
    *,
    normalization="batch",
    training=False,
    momentum=0.9,
    groups=None,
    epsilon=1e-5,
):
    """The lock's forward pass `gamma * normalize(inputs) + beta`, as a pure function.

    `KeyLock.call` and the attacker's functional model (`attacks.model.AttackerModel`) both run it.
    `gamma` and `beta` (per channel, e.g. from `lock_affine`, or per position and channel for a
    spatial lock) broadcast over the batch (and spatial) axes of channels-last `inputs`.

    normalization='batch' takes the moving `statistics` (mean, variance): in training it normalises
    with the batch's own statistics and returns the moving ones moved towards them (by `1 -
    momentum`, with the unbiased batch variance, as PyTorch), else it normalises with `statistics`
    and returns them unchanged. It runs as one FusedBatchNormV3 kernel (scale = gamma, offset =
    beta; half-precision inputs with float32 statistics, as Keras' BatchNormalization). 'group'
    (see `resolve_groups`) and 'layer' normalise each example with its own statistics (in float32
    for half-precision inputs); 'none' does not normalise. These hold no statistics (pass None).

    Returns:
      (outputs, statistics): outputs of the dtype of `inputs`, and the (moved) moving statistics.
    """
    if normalization == "batch":
        if gamma.shape.rank == 1:
            return _batch_lock(inputs, gamma, beta, statistics, training, momentum, epsilon)
        channels = inputs.shape[-1]
        outputs, statistics = _batch_lock(
            inputs, tf.ones([channels]), tf.zeros([channels]), statistics, training, momentum, epsilon
        )
        return tf.cast(gamma, outputs.dtype) * outputs + tf.cast(beta, outputs.dtype), statistics
    x = tf.cast(inputs, tf.float32) if inputs.dtype in _HALF_PRECISION else inputs
    if normalization == "layer":
        mean, variance = tf.nn.moments(x, list(range(1, x.shape.rank)), keepdims=True)
        x = (x - mean) * tf.math.rsqrt(variance + epsilon)
    elif normalization == "group":
        channels = x.shape[-1]
        num_groups = resolve_groups(channels, groups)
        shape = tf.shape(x)
        grouped = tf.reshape(x, tf.concat([shape[:-1], [num_groups, channels // num_groups]], 0))
        axes = list(range(1, x.shape.rank - 1)) + [x.shape.rank]
        mean, variance = tf.nn.moments(grouped, axes, keepdims=True)
        x = tf.reshape((grouped - mean) * tf.math.rsqrt(variance + epsilon), shape)
    elif normalization != "none":
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    outputs = tf.cast(gamma, x.dtype) * x + tf.cast(beta, x.dtype)
    return tf.cast(outputs, inputs.dtype), statistics


def _batch_lock(inputs, gamma, beta, statistics, training, momentum, epsilon):
    """keylock_apply's normalization='batch': one fused kernel per pass, for features of any rank.

    FusedBatchNormV3 is the kernel Keras' BatchNormalization runs (through `tf.compat.v1`); its public
    `tf.raw_ops` form keeps PyTorch's unbiased moving variance, which Keras' layer does not.
    """
    features = inputs if inputs.shape.rank == 4 else tf.reshape(inputs, [-1, 1, 1, inputs.shape[-1]])
    mean, variance = statistics
    outputs, mean, variance = tf.raw_ops.FusedBatchNormV3(
        x=features,
        scale=tf.cast(gamma, tf.float32),
        offset=tf.cast(beta, tf.float32),
        mean=mean,
        variance=variance,
        epsilon=epsilon,
        exponential_avg_factor=1.0 - momentum if training else 1.0,
        is_training=training,
    )[:3]
    outputs = outputs if inputs.shape.rank == 4 else tf.reshape(outputs, tf.shape(inputs))
    return outputs, ((mean, variance) if training else statistics)


class _AffineNormalization(tf.keras.layers.Layer):
    """What KeyLock and AffineNorm share: `gamma * normalize(x) + beta` through `keylock_apply`, with
    the moving statistics of normalization='batch'. A subclass creates its affine weights in
    `_build_affine` and says what gamma and beta are in `affine_parameters`."""

    def __init__(self, normalization="batch", groups=None, momentum=0.9, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.normalization = normalization
        self.groups = groups
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.input_spec = tf.keras.layers.InputSpec(min_ndim=2)

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"{type(self).__name__} needs a known channel (last) dimension")
        self.channels = int(channels)
        if self.normalization == "group":
            resolve_groups(self.channels, self.groups)
        self.input_spec = tf.keras.layers.InputSpec(ndim=input_shape.rank, axes={-1: self.channels})
        self._build_affine(input_shape)
        if self.normalization == "batch":
            # Read in float32 under mixed precision, as Keras' BatchNormalization reads its statistics.
            self.moving_mean = self.add_weight(
                name="moving_mean",
                shape=(self.channels,),
                initializer="zeros",
                trainable=False,
                experimental_autocast=False,
            )
            self.moving_variance = self.add_weight(
                name="moving_variance",
                shape=(self.channels,),
                initializer="ones",
                trainable=False,
                experimental_autocast=False,
            )
        super().build(input_shape)

    def _build_affine(self, input_shape):
        """Creates the weights gamma and beta come from (before the moving statistics)."""
        raise NotImplementedError

    def affine_parameters(self, training=False):
        """(gamma, beta) as the layer applies them in a training step (`training`) or not."""
        raise NotImplementedError

    def call(self, inputs, training=None):
        training = bool(training) and self.trainable  # a frozen layer runs in inference mode
        statistics = (self.moving_mean, self.moving_variance) if self.normalization == "batch" else None
        outputs, moved = keylock_apply(
            inputs,
            *self.affine_parameters(training),
            statistics,
            normalization=self.normalization,
            training=training,
            momentum=self.momentum,
            groups=self.groups,
            epsilon=self.epsilon,
        )
        if training and statistics is not None:
            self.moving_mean.assign(moved[0])
            self.moving_variance.assign(moved[1])
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            normalization=self.normalization, groups=self.groups, momentum=self.momentum, epsilon=self.epsilon
        )
        return config


@tf.keras.utils.register_keras_serializable(package="tfkl")
class KeyLock(_AffineNormalization):
    """Key-lock block of FedKL: `gamma * normalize(x) + beta` (`keylock_apply`).

    `gamma = act(key @ scale_kernel + scale_bias)` and `beta = act(key @ shift_kernel + shift_bias)`,
    with one secret `key` for both, broadcast over the batch and spatial axes of channels-last `x`.
    The key (non-trainable) and the lock weights are private to the client; the
    normalisation's moving statistics (normalization='batch') are shared like any BatchNorm's.
    As in Keras' BatchNormalization, a frozen layer (`trainable=False`) runs in inference mode,
    and under a mixed-precision policy the variables stay float32 while the layer computes in
    the policy's compute dtype (the normalisation itself in float32).

    kernel='compact' holds each kernel as `gain * W0 + outer(lock_key, delta)`: W0 is drawn from
    the private `lock_seed` (Philox, uniform over the lock initialiser's range) and never stored,
    `lock_key` is the key the lock was trained with (private), `gain` a trainable scalar and `delta`
    a trainable vector of the affine size (`gains`, `deltas` and `biases` hold the scale kernel's
    and the shift kernel's, in that order). SGD on a kernel moves it by `outer(key, g)` (g the
    projection's gradient) plus weight decay and momentum, so it stays of that form while the key
    is the lock key: the layer gives delta the gradient g and gain a zero gradient, and an
    optimizer that adds weight decay and momentum to the gradient (`tfkl.optimizers.TorchSGD`)
    trains (gain, delta) exactly as it would train the full kernels. A training step from zero
    deltas (an untrained lock) takes the running key as the lock key; from nonzero ones it needs the
    running key to be the lock key (it fails otherwise). Any key evaluates:
    `key @ kernel = gain * (key @ W0) + (key . lock_key) * delta`, with `key @ W0` cached while the
    key and the seed stay. `materialized_kernels` gives the full form's weights.

    Args:
      key_dim: length of the secret key (the paper uses 1024).
      activation: 'relu' (paper) or 'sigmoid', applied to gamma and beta.
      normalization: 'batch' (no affine, paper), 'group', 'layer' or 'none'.
      groups: number of groups for normalization='group'; default: the largest divisor of the
        channel count that is at most 32.
      momentum, epsilon: moving-statistics momentum (Keras convention; 0.9 == PyTorch's 0.1) and
        variance epsilon.
      lock_initializer: initialiser of the lock kernels and biases; default PyTorch's Linear default
        (kernel='compact' needs a uniform one).
      key: optional initial key (array-like of shape (key_dim,)); default a fresh CSPRNG key.
      affine: 'channel' (the paper's: one gamma and beta per channel) or 'spatial' (one per position
        and channel: the lock's unknowns then outnumber the input image's pixels; needs inputs of a
        fixed spatial size, and the kernels grow to key_dim x height x width x channels).
      kernel: 'full' (the kernels as variables) or 'compact' (see above: the same arithmetic, with
        private variables of the affine size instead of key_dim x affine size).
      round_noise: 0 (the paper's) or the strength s of a secret random affine of the normalised
        input in training steps: `gamma * (1 + s * e1)` and `beta + gamma * s * e2` with e1, e2
        standard normal per entry of gamma, drawn by `draw_round_noise` (a federated client draws
        them once per round from its key and the round's weights). Inference never applies it.

    Call arguments:
      inputs: channels-last features of rank >= 2.
      training: Python bool; True normalises with the batch's statistics and moves the moving
        statistics towards them (normalization='batch'). Ignored (False) when the layer is frozen.
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
        affine="channel",
        kernel="full",
        round_noise=0.0,
        **kwargs,
    ):
        super().__init__(normalization, groups, momentum, epsilon, **kwargs)
        if affine not in AFFINES:
            raise ValueError(f"affine must be one of {AFFINES}, got {affine!r}")
        if kernel not in LOCK_KERNELS:
            raise ValueError(f"kernel must be one of {LOCK_KERNELS}, got {kernel!r}")
        if int(key_dim) < 1:
            raise ValueError(f"key_dim must be a positive integer, got {key_dim}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not (np.isfinite(round_noise) and round_noise >= 0):
            raise ValueError(f"round_noise must be a finite number >= 0, got {round_noise}")
        self.round_noise = float(round_noise)
        self.key_dim = int(key_dim)
        self.affine = affine
        self.kernel = kernel
        self.activation = activation
        self.lock_initializer = tf.keras.initializers.get(lock_initializer) if lock_initializer else None
        if kernel == "compact":
            self.uniform_range()  # raises for an initialiser that is not uniform
        self._initial_key = None if key is None else keys_lib.validate_key(key, self.key_dim)

    def _build_affine(self, input_shape):
        self.affine_shape = (self.channels,)
        if self.affine == "spatial":
            if not input_shape[1:].is_fully_defined():
                raise ValueError(f"a spatial KeyLock needs a fixed input size, got {input_shape}")
            self.affine_shape = tuple(int(d) for d in input_shape[1:])
        initial_key = self._initial_key
        if initial_key is None:
            initial_key = keys_lib.generate_key(self.key_dim)
        self.key = self.add_weight(
            name="key",
            shape=(self.key_dim,),
            initializer=tf.constant_initializer(initial_key),
            trainable=False,
            experimental_autocast=self.kernel == "full",
        )
        if self.kernel == "full":
            self._build_full_lock()
        else:
            self._build_compact_lock(initial_key)
        if self.round_noise > 0:
            self.noise = self.add_weight(
                name="round_noise",
                shape=(2,) + self.affine_shape,
                initializer="zeros",
                trainable=False,
                experimental_autocast=False,
            )

    def _build_full_lock(self):
        lock_shape = (self.key_dim, self.affine_size)
        bias_shape = (self.affine_size,)
        self.scale_kernel = self.add_weight(name="scale_kernel", shape=lock_shape, initializer=self._lock_init(0))
        self.scale_bias = self.add_weight(name="scale_bias", shape=bias_shape, initializer=self._lock_init(1))
        self.shift_kernel = self.add_weight(name="shift_kernel", shape=lock_shape, initializer=self._lock_init(2))
        self.shift_bias = self.add_weight(name="shift_bias", shape=bias_shape, initializer=self._lock_init(3))

    def _build_compact_lock(self, initial_key):
        """The compact lock's variables (float32 under any policy) and its cached key projection."""

        def weight(name, shape, initializer, trainable=True):
            return self.add_weight(
                name=name, shape=shape, initializer=initializer, trainable=trainable, experimental_autocast=False
            )

        bias_inits = [self._lock_init(i) for i in (1, 3)]  # those of the full form's scale and shift biases
        size = (2, self.affine_size)
        self.lock_seed = weight("lock_seed", (SEED_SIZE,), tf.constant_initializer(self._initial_seed()), False)
        self.lock_key = weight("lock_key", (self.key_dim,), tf.constant_initializer(initial_key), False)
        self.gains = weight("gains", (2,), "ones")
        self.deltas = weight("deltas", size, "zeros")
        self.biases = weight("biases", size, lambda shape, dtype: tf.stack([i(shape[1:], dtype) for i in bias_inits]))
        self.projected_seed = weight("projected_seed", (SEED_SIZE,), tf.constant_initializer(-1.0), False)
        self.projected_key = weight("projected_key", (self.key_dim,), "zeros", False)
        self.key_projection = weight("key_projection", (2, self.affine_size), "zeros", False)

    def _initial_seed(self):
        """A fresh CSPRNG seed of the initial kernels, or one derived from a seeded lock initialiser."""
        seed = self.lock_initializer.get_config().get("seed") if self.lock_initializer else None
        return draw_lock_seed(None if seed is None else [seed, 0x5EED])

    def _lock_init(self, index):
        """The lock weights' initialiser; a seeded one is re-seeded per weight so they differ."""
        if self.lock_initializer is None:
            return TorchLinearUniform(self.key_dim)
        config = self.lock_initializer.get_config()
        if config.get("seed") is not None:
            config["seed"] += index
        return self.lock_initializer.__class__.from_config(config)

    def uniform_range(self):
        """(low, high) of the lock initialiser's uniform distribution (ValueError if it is not uniform)."""
        initializer = self.lock_initializer or TorchLinearUniform(self.key_dim)
        if isinstance(initializer, TorchLinearUniform):
            return -initializer.bound, initializer.bound
        if isinstance(initializer, tf.keras.initializers.RandomUniform):
            return float(initializer.minval), float(initializer.maxval)
        raise ValueError(
            "private lock weights and kernel='compact' need a uniform lock initialiser, "
            f"got {type(initializer).__name__}"
        )

    @property
    def affine_size(self):
        """The number of gamma values (and of beta values): channels, or positions x channels."""
        return int(np.prod(self.affine_shape))

    @property
    def lock_weights(self):
        """The lock's variables, which a client trains and keeps: FULL_LOCK_WEIGHT_NAMES or, for
        kernel='compact', COMPACT_LOCK_WEIGHT_NAMES."""
        names = FULL_LOCK_WEIGHT_NAMES if self.kernel == "full" else COMPACT_LOCK_WEIGHT_NAMES
        return [getattr(self, name) for name in names]

    @property
    def private_weights(self):
        """The client's secret: the key and the lock weights."""
        return [self.key] + self.lock_weights

    @property
    def cache_weights(self):
        """What derives from the secret and is not kept: a compact lock's cached key projection and the
        round's noise (round_noise > 0)."""
        cache = [] if self.kernel == "full" else [self.projected_seed, self.projected_key, self.key_projection]
        return cache + ([self.noise] if self.round_noise > 0 else [])

    def draw_round_noise(self, seed):
        """Draws the noise of the training steps to come (e1, e2 of `round_noise`) from a stateless
        `seed` ([2] int64); returns the assignment."""
        noise = tf.random.stateless_normal((2,) + self.affine_shape, seed, dtype=tf.float32)
        return self.noise.assign(self.round_noise * noise)

    def initial_kernels(self):
        """A compact lock's W0 of both kernels, [2, key_dim, affine_size] (scale, shift): uniform over
        the lock initialiser's range, drawn by Philox from `lock_seed`."""
        parts = tf.cast(self.lock_seed, tf.int64)
        seed = parts[0::2] + parts[1::2] * _SEED_BASE
        low, high = self.uniform_range()
        unit = tf.random.stateless_uniform([2, self.key_dim, self.affine_size], seed, alg="philox")
        return low + (high - low) * unit

    def materialized_kernels(self):
        """(scale_kernel, scale_bias, shift_kernel, shift_bias) as tensors, a compact lock's included."""
        if self.kernel == "full":
            return tuple(tf.convert_to_tensor(v) for v in self.lock_weights)
        outer = tf.einsum("k,in->ikn", self.lock_key, self.deltas)
        kernels = self.gains[:, None, None] * self.initial_kernels() + outer
        scale_bias, shift_bias = tf.unstack(self.biases)
        return kernels[0], scale_bias, kernels[1], shift_bias

    def lock_parameters(self, key=None):
        """Returns (gamma, beta), each of shape `affine_shape`, for `key` (default the layer's own)."""
        if key is None and self.kernel == "compact":
            return self._compact_affine(training=False)
        if self.kernel == "compact":
            return lock_affine(
                tf.convert_to_tensor(key, tf.float32), *self.materialized_kernels(), self.activation, self.affine_shape
            )
        key = self.key if key is None else tf.convert_to_tensor(key, self.compute_dtype)
        return lock_affine(key, *self.lock_weights, self.activation, self.affine_shape)

    def affine_parameters(self, training=False):
        gamma, beta = self._compact_affine(training) if self.kernel == "compact" else self.lock_parameters()
        if not (training and self.round_noise > 0):
            return gamma, beta
        noise = tf.cast(self.noise, gamma.dtype)
        return gamma * (1 + noise[0]), beta + gamma * noise[1]

    def _compact_affine(self, training):
        """A compact lock's (gamma, beta): act(gain * (key @ W0) + (key . lock_key) * delta + bias)."""
        key = tf.convert_to_tensor(self.key)
        lock_key = self._training_lock_key(key) if training else tf.convert_to_tensor(self.lock_key)
        overlap = tf.reduce_sum(key * lock_key)
        act = tf.nn.relu if self.activation == "relu" else tf.sigmoid
        projection = _compact_projection(overlap, self._key_projection(key), self.gains, self.deltas, self.biases)
        gamma, beta = tf.unstack(tf.reshape(act(projection), (2,) + self.affine_shape))
        return gamma, beta

    def _training_lock_key(self, key):
        """The lock key of a training step: the running key, which an untrained lock (zero deltas)
        takes as its lock key and a trained one must already have."""
        # tf.not_equal, not `!=`: in TFF's graphs `!=` on a variable compares identities.
        untrained = tf.logical_not(tf.reduce_any(tf.not_equal(self.deltas, 0.0)))
        lock_key = tf.where(untrained, key, self.lock_key)
        same = tf.debugging.Assert(
            tf.reduce_all(tf.equal(key, lock_key)),
            ["a compact KeyLock trains only under the key its lock was trained with (its lock_key)"],
        )
        with tf.control_dependencies([same, self.lock_key.assign(lock_key)]):
            return tf.identity(lock_key)

    def _key_projection(self, key):
        """`key @ W0` of both kernels, [2, affine_size]: computed when the key or the seed changes."""
        cached = tf.reduce_all(tf.equal(self.projected_key, key)) & tf.reduce_all(
            tf.equal(self.projected_seed, self.lock_seed)
        )

        def compute():
            value = tf.einsum("k,ikn->in", key, self.initial_kernels())
            assigned = [
                self.key_projection.assign(value),
                self.projected_key.assign(key),
                self.projected_seed.assign(self.lock_seed),
            ]
            with tf.control_dependencies(assigned):
                return tf.identity(value)

        return tf.cond(cached, self.key_projection.read_value, compute)

    def get_config(self):
        # The key is a secret: it travels with the weights (client checkpoints), never in the config.
        config = super().get_config()
        config.update(
            key_dim=self.key_dim,
            activation=self.activation,
            lock_initializer=self._serialized_lock_initializer(),
            affine=self.affine,
            kernel=self.kernel,
            round_noise=self.round_noise,
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


@tf.keras.utils.register_keras_serializable(package="tfkl")
class AffineNorm(_AffineNormalization):
    """The FedAvg control's block: KeyLock's normalisation with a learned affine and no key.

    `gamma * normalize(x) + beta` through the same `keylock_apply` as `KeyLock` (same normalisation,
    statistics, momentum and epsilon), with `gamma` (initially 1) and `beta` (initially 0) plain
    trainable weights, shared like any other: a model with these blocks in place of its KeyLock
    blocks differs from the locked one by where gamma and beta come from, nothing else.

    Args:
      normalization, groups, momentum, epsilon: as `KeyLock`'s.

    Call arguments:
      inputs, training: as `KeyLock`'s.
    """

    def _build_affine(self, input_shape):
        self.gamma = self.add_weight(name="gamma", shape=(self.channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(self.channels,), initializer="zeros")

    def affine_parameters(self, training=False):
        return self.gamma, self.beta
