"""The attacker's view of a model: the server's knowledge, threat models and a functional forward pass.

A curious server holds the architecture and the shared weights (`ServerView`), never the key or
the lock weights. `AttackerModel` rebuilds the architecture from that view and evaluates it as a
pure function of (shared weights, lock parameters, images), so attacks can differentiate through
gradients, unrolled local steps and unknown lock parameters without touching any Keras variable.
Only `extract_secret` reads a victim's private variables; only the `oracle` threat accepts it.
"""

import contextlib
import dataclasses

import numpy as np
import tensorflow as tf

from attacks.names import THREATS
from tfkl import capture as capture_lib
from tfkl import keys as keys_lib
from tfkl import private
from tfkl.keylock import AffineNorm, KeyLock, keylock_apply, lock_affine
from tfkl.securing import node_call_arguments

_WEIGHTLESS = (
    tf.keras.layers.InputLayer,
    tf.keras.layers.ZeroPadding2D,
    tf.keras.layers.Activation,
    tf.keras.layers.ReLU,
    tf.keras.layers.Flatten,
    tf.keras.layers.Add,
    tf.keras.layers.GlobalAveragePooling2D,
    tf.keras.layers.MaxPooling2D,
    tf.keras.layers.AveragePooling2D,
    tf.keras.layers.Reshape,
)


@dataclasses.dataclass(frozen=True)
class ServerView:
    """What a curious server holds: the architecture (Keras JSON, which carries no key) and the
    shared weights in `tfkl.shared_variables` order. There is no field for anything private."""

    model_json: str
    weights: tuple
    names: tuple
    trainable: tuple

    @classmethod
    def from_model(cls, model: tf.keras.Model) -> "ServerView":
        """The server's view of `model`: its architecture and shared variables only."""
        shared = private.shared_variables(model)
        return cls(
            model.to_json(),
            tuple(v.numpy() for v in shared),
            tuple(v.name for v in shared),
            tuple(bool(v.trainable) for v in shared),
        )

    @classmethod
    def from_capture(cls, capture: capture_lib.Capture) -> "ServerView":
        """The view from a capture: the architecture its meta carries, the global weights it was sent
        (a meta that does not fit the weights raises tfkl.capture.CaptureFormatError)."""
        model = capture_lib.shared_model(capture)
        return cls(
            model.to_json(),
            tuple(np.asarray(w) for w in capture.global_weights),
            tuple(capture.meta["variable_names"]),
            tuple(bool(t) for t in capture.meta["trainable"]),
        )


def extract_secret(model: tf.keras.Model) -> dict[str, tuple[np.ndarray, ...]]:
    """The victim's secret per lock layer (key and lock weights): for the `oracle` threat only."""
    weights = extract_lock_weights(model)
    return {lock.name: (lock.key.numpy(),) + weights[lock.name] for lock in private.lock_layers(model)}


def extract_lock_weights(model: tf.keras.Model) -> dict[str, tuple[np.ndarray, ...]]:
    """The victim's lock weights without the key, per lock layer: for the `adaptive-key` threat, whose
    attacker knows them (in round 1 every client trains from the server's initial lock weights)."""
    return {lock.name: tuple(w.numpy() for w in lock.materialized_kernels()) for lock in private.lock_layers(model)}


def _inverse_softplus(y):
    return float(np.log(np.expm1(y)))


# Start values of the adaptive attacker's lock latents (`AttackerModel.initial_lock_latent`).
LOCK_INITS = ("uniform", "prior")
PRIOR_FLOOR = 1e-3  # a 'prior' draw of 0 starts at this (softplus cannot reach 0)
DEAD_TOLERANCE = 1e-6  # a channel's kernel gradient norm at most this times the largest counts as zero
DEAD_LATENT = -1e4  # softplus and sigmoid of it are exactly 0 in float32, with a zero gradient


def _prior_lock_values(rng, lock, problems):
    """[problems, affine size] gamma and beta of freshly initialised locks: act(key @ W + b), key ~ U[0, 1),
    W and b ~ U(+-1/sqrt(key_dim)) (PyTorch's Linear init, the paper's)."""
    bound = 1.0 / np.sqrt(lock.key_dim)
    act = (lambda z: np.maximum(z, 0.0)) if lock.activation == "relu" else (lambda z: 1.0 / (1.0 + np.exp(-z)))
    keys = rng.uniform(0.0, 1.0, (problems, lock.key_dim))
    values = []
    for _ in range(2):
        kernel = rng.uniform(-bound, bound, (problems, lock.key_dim, lock.affine_size))
        bias = rng.uniform(-bound, bound, (problems, lock.affine_size))
        values.append(act(np.einsum("pk,pkc->pc", keys, kernel) + bias))
    return values


class AttackerModel:
    """The model as an attacker evaluates it under one threat model.

    Args:
      view: the `ServerView`.
      threat: one of THREATS. 'none' needs a view without locks; the others a locked view.
        'fixed-key': the attacker's own random key and lock weights (seed `seed`), never optimised;
        'adaptive': per lock, gamma = f(g) and beta = f(b) with free latents optimised with the image
        (f = softplus for ReLU locks, sigmoid for sigmoid locks);
        'adaptive-key': the victim's lock weights are known (`secret` = `extract_lock_weights`), the
        key = sigmoid(latent) in (0, 1)^key_dim is optimised with the image;
        'oracle': the victim's key and lock weights, given as `secret` (see `extract_secret`).
      secret: what the attacker knows of the secret: only for 'oracle' and 'adaptive-key'.
      seed: the attacker's seed for its fixed key and lock weights.
    """

    def __init__(self, view: ServerView, threat: str, secret: dict | None = None, seed: int = 0) -> None:
        if threat not in THREATS:
            raise ValueError(f"threat must be one of {THREATS}, got {threat!r}")
        if (secret is not None) != (threat in ("oracle", "adaptive-key")):
            raise ValueError(
                "the 'oracle' (key and lock weights) and 'adaptive-key' (lock weights) threats, and "
                "only they, take a secret"
            )
        self.view, self.threat = view, threat
        self.model = tf.keras.models.model_from_json(view.model_json)
        shared = private.shared_variables(self.model)
        if [tuple(v.shape) for v in shared] != [tuple(np.shape(w)) for w in view.weights]:
            raise ValueError("the view's weights do not fit its architecture")
        self.locks = private.lock_layers(self.model)
        if threat == "none" and self.locks:
            raise ValueError("threat 'none' attacks the backbone without the lock; the view has locks")
        if threat != "none" and not self.locks:
            raise ValueError(f"threat {threat!r} needs a locked model; the view has no KeyLock")
        # The rebuilt model's private variables are never read: zero them to make that visible.
        for variable in private.private_variables(self.model):
            variable.assign(tf.zeros_like(variable))
        self._index = {id(v): i for i, v in enumerate(shared)}
        self.weights = [tf.constant(w) for w in view.weights]
        self.trainable = list(view.trainable)
        self.input_shape = tuple(self.model.input_shape[1:])
        self.num_classes = int(self.model.output_shape[-1])
        self.lock_weights = self._lock_weights(secret, seed)

    def _lock_weights(self, secret, seed):
        """Per lock: (key, scale_kernel, scale_bias, shift_kernel, shift_bias) for 'fixed-key',
        'adaptive-key' (whose key comes from the latent: a zero placeholder here) and 'oracle'; None otherwise."""
        if self.threat in ("oracle", "adaptive-key"):
            return self.lock_weights_from(secret)
        if self.threat != "fixed-key":
            return None
        rng = np.random.default_rng(seed)
        weights = {}
        for lock in self.locks:
            bound = 1.0 / np.sqrt(lock.key_dim)  # PyTorch's Linear default, the paper's lock init
            draw = lambda *shape, bound=bound: tf.constant(rng.uniform(-bound, bound, shape), tf.float32)  # noqa: E731
            key = tf.constant(keys_lib.generate_key(lock.key_dim, seed=int(rng.integers(2**31))), tf.float32)
            weights[lock.name] = (
                key,
                draw(lock.key_dim, lock.affine_size),
                draw(lock.affine_size),
                draw(lock.key_dim, lock.affine_size),
                draw(lock.affine_size),
            )
        return weights

    def lock_weights_from(self, secret):
        """{lock name: (key, scale_kernel, scale_bias, shift_kernel, shift_bias)} as this threat ('oracle' or
        'adaptive-key', whose key is a zero placeholder) computes with them, from a secret as it takes one."""
        if set(secret) != {lock.name for lock in self.locks}:
            raise ValueError(
                f"the secret names locks {sorted(secret)}, the model has {[lock.name for lock in self.locks]}"
            )
        if self.threat == "adaptive-key":
            secret = {lock.name: (np.zeros(lock.key_dim),) + tuple(secret[lock.name]) for lock in self.locks}
        return {name: tuple(tf.constant(v, tf.float32) for v in values) for name, values in secret.items()}

    # -- what a compiled attack takes ------------------------------------------------------
    def tensors(self):
        """The model's values a compiled attack takes as arguments (see `bound`): the shared weights and the
        known lock weights (None unless 'fixed-key', 'adaptive-key' or 'oracle')."""
        return list(self.weights), self.lock_weights

    @contextlib.contextmanager
    def bound(self, tensors):
        """Within it the model computes with `tensors` (a compiled attack's symbolic arguments, as `tensors()`
        gives them) in place of its own, so that one trace serves every model of the same `structure()`."""
        own = self.weights, self.lock_weights
        self.weights, self.lock_weights = list(tensors[0]), tensors[1]
        try:
            yield
        finally:
            self.weights, self.lock_weights = own

    def structure(self):
        """What a compiled attack on this model depends on besides `tensors()`: the architecture, which
        variables train, the weights' shapes and how the threat makes gamma/beta ('oracle' and 'fixed-key'
        alike: from lock weights it knows)."""
        source = "known lock weights" if self.threat in ("oracle", "fixed-key") else self.threat
        shapes = tuple(tuple(w.shape) for w in self.weights)
        return self.view.model_json, tuple(self.trainable), shapes, source

    # -- lock parameters -------------------------------------------------------------------
    def lock_latent_size(self):
        """Length of the adaptive attackers' free lock parameters: 2 * the lock's affine size (channels,
        or positions x channels for a spatial lock; 'adaptive') or the key ('adaptive-key') per lock."""
        if self.threat == "adaptive-key":
            return sum(lock.key_dim for lock in self.locks)
        return sum(2 * lock.affine_size for lock in self.locks) if self.threat == "adaptive" else 0

    def initial_lock_latent(self, problems, seed=0, schemes=("uniform",)):
        """[problems, lock_latent_size] start values; problem p starts from scheme schemes[p % len(schemes)]
        (see LOCK_INITS). 'uniform': gamma ~ U(0.5, 1.5), beta ~ U(0, 0.5) (ReLU locks); 'prior': gamma and
        beta drawn as a freshly initialised lock makes them, act(key @ W + b) with a key ~ U[0, 1) and
        PyTorch's Linear init for W and b (what the architecture and the published init imply, no secret:
        about half of a ReLU lock's values are 0, the rest ~0.3); for 'adaptive-key' a key ~ U(0.05, 0.95)
        whatever the scheme."""
        unknown = sorted(set(schemes) - set(LOCK_INITS))
        if unknown or not schemes:
            raise ValueError(f"lock init schemes must be among {LOCK_INITS}, got {list(schemes)}")
        size = self.lock_latent_size()
        if not size:
            return tf.zeros([problems, 0])
        rng = np.random.default_rng(seed)
        if self.threat == "adaptive-key":
            key = rng.uniform(0.05, 0.95, (problems, size))
            return tf.constant(np.log(key / (1 - key)), tf.float32)
        chosen = np.array([schemes[p % len(schemes)] for p in range(problems)])
        parts = []
        for lock in self.locks:
            gamma = rng.uniform(0.5, 1.5, (problems, lock.affine_size))
            beta = rng.uniform(0.0, 0.5, (problems, lock.affine_size))
            if "prior" in schemes:  # drawn only then: 'uniform' alone keeps its earlier start values
                prior_gamma, prior_beta = _prior_lock_values(rng, lock, problems)
                gamma = np.where((chosen == "prior")[:, None], prior_gamma, gamma)
                beta = np.where((chosen == "prior")[:, None], prior_beta, beta)
            if lock.activation == "relu":
                floor = np.where((chosen == "prior")[:, None], PRIOR_FLOOR, 0.0)
                gamma, beta = np.maximum(gamma, floor), np.maximum(beta, floor)
                to_latent = np.vectorize(_inverse_softplus)
            else:
                gamma, beta = np.clip(gamma, 0.05, 0.95), np.clip(beta, 0.05, 0.95)
                to_latent = lambda p: np.log(p / (1 - p))  # noqa: E731
            parts += [to_latent(gamma), to_latent(beta)]
        return tf.constant(np.concatenate(parts, axis=1), tf.float32)

    def lock_sources(self):
        """Per lock (in order), the index into a target's values (the trainable shared variables) of the
        kernel of the Conv2D/Dense layer that feeds it directly, or None. A channel whose gamma is 0 gets
        an exactly zero gradient in that kernel (train-mode normalisation passes gamma * ... back), which
        is what the 'relearn' strategies read from the captured gradient."""
        trainable_index = {i: k for k, i in enumerate(i for i, t in enumerate(self.trainable) if t)}
        sources = []
        for lock in self.locks:
            inbound = [layer for node in lock._inbound_nodes for layer in tf.nest.flatten(node.inbound_layers)]
            source = None
            if len(inbound) == 1 and isinstance(inbound[0], (tf.keras.layers.Conv2D, tf.keras.layers.Dense)):
                position = self._index.get(id(inbound[0].kernel))
                source = trainable_index.get(position)
            sources.append(source)
        return sources

    def dead_lock_channels(self, target_values, tolerance=DEAD_TOLERANCE):
        """[lock_latent_size] bools for 'adaptive': True at the gamma latents of channels whose source
        kernel's gradient in `target_values` (one problem's, a list per trainable variable) is zero up to
        `tolerance` times the largest channel's norm, i.e. whose gamma must be 0; False elsewhere (betas,
        locks without a source, spatial locks: a zero gamma at one position leaves the kernel's gradient
        from the others). Reads only the captured gradient."""
        parts = []
        for lock, source in zip(self.locks, self.lock_sources()):
            if source is None or lock.affine == "spatial":
                dead = tf.zeros([lock.affine_size], tf.bool)
            else:
                kernel = tf.convert_to_tensor(target_values[source], tf.float32)
                norms = tf.sqrt(tf.reduce_sum(tf.square(tf.reshape(kernel, [-1, lock.channels])), 0))
                dead = norms <= tolerance * tf.reduce_max(norms)
            parts += [dead, tf.zeros([lock.affine_size], tf.bool)]
        return tf.concat(parts, 0) if parts else tf.zeros([0], tf.bool)

    def lock_values(self, latent=None, lock_weights=None):
        """{lock name: (gamma, beta)} under this threat; `latent` for 'adaptive', `lock_weights`
        overrides the known lock weights (e.g. during simulated local steps)."""
        values, offset = {}, 0
        for lock in self.locks:
            if self.threat == "adaptive":
                squash = tf.nn.softplus if lock.activation == "relu" else tf.sigmoid
                size, shape = lock.affine_size, lock.affine_shape
                values[lock.name] = (
                    tf.reshape(squash(latent[offset : offset + size]), shape),
                    tf.reshape(squash(latent[offset + size : offset + 2 * size]), shape),
                )
                offset += 2 * size
            else:
                key, sk, sb, hk, hb = (lock_weights or self.lock_weights)[lock.name]
                if self.threat == "adaptive-key":
                    key = tf.sigmoid(latent[offset : offset + lock.key_dim])
                    offset += lock.key_dim
                values[lock.name] = lock_affine(
                    tf.cast(key, tf.float32), sk, sb, hk, hb, lock.activation, lock.affine_shape
                )
        return values

    def trainable_lock_weights(self):
        """The known lock weights that a client trains (kernels, biases; not the key), flattened."""
        if self.lock_weights is None:
            return []
        return [w for lock in self.locks for w in self.lock_weights[lock.name][1:]]

    def pack_lock_weights(self, flat):
        """Inverse of `trainable_lock_weights`: rebuilds the per-lock tuples around the known keys."""
        packed = {}
        for i, lock in enumerate(self.locks):
            packed[lock.name] = (self.lock_weights[lock.name][0],) + tuple(flat[4 * i : 4 * i + 4])
        return packed

    # -- forward ---------------------------------------------------------------------------
    def __call__(self, weights, images, locks, training=True):
        """Logits of `images` (one batch, one problem) for shared `weights` (list of tensors in view
        order) and `locks` ({name: (gamma, beta)}); train-mode normalisation uses batch statistics
        and never updates any moving statistic."""
        model = self.model
        tensors = {str(id(model.inputs[0])): images}
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                if node.is_input:
                    continue
                args, kwargs = node_call_arguments(node, tensors)
                outputs = self._apply(node.layer, args, weights, locks, training)
                for tensor_id, tensor in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
                    tensors[tensor_id] = tensor
        return tensors[str(id(model.outputs[0]))]

    def _w(self, weights, variable):
        return weights[self._index[id(variable)]]

    def _apply(self, layer, args, weights, locks, training):
        x = args[0]
        if isinstance(layer, tf.keras.layers.Conv2D) and type(layer) is tf.keras.layers.Conv2D:
            y = tf.nn.conv2d(
                x, self._w(weights, layer.kernel), layer.strides, layer.padding.upper(), dilations=layer.dilation_rate
            )
            if layer.use_bias:
                y = y + self._w(weights, layer.bias)
            return layer.activation(y)
        if isinstance(layer, tf.keras.layers.Dense):
            y = tf.matmul(x, self._w(weights, layer.kernel))
            if layer.use_bias:
                y = y + self._w(weights, layer.bias)
            return layer.activation(y)
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            if training:
                mean, variance = tf.nn.moments(x, list(range(x.shape.rank - 1)))
            else:
                mean, variance = self._w(weights, layer.moving_mean), self._w(weights, layer.moving_variance)
            gamma = self._w(weights, layer.gamma) if layer.scale else None
            beta = self._w(weights, layer.beta) if layer.center else None
            return tf.nn.batch_normalization(x, mean, variance, beta, gamma, layer.epsilon)
        if isinstance(layer, (KeyLock, AffineNorm)):  # AffineNorm: the FedAvg control's learned, shared affine
            statistics = None
            if layer.normalization == "batch":
                statistics = self._w(weights, layer.moving_mean), self._w(weights, layer.moving_variance)
            if isinstance(layer, KeyLock):
                affine = locks[layer.name]
            else:
                affine = self._w(weights, layer.gamma), self._w(weights, layer.beta)
            return keylock_apply(
                x,
                *affine,
                statistics,
                normalization=layer.normalization,
                training=training,
                groups=layer.groups,
                epsilon=layer.epsilon,
            )[0]
        if isinstance(layer, tf.keras.layers.Dropout):
            return x  # the client's dropout mask is unknowable; the attacker runs without it
        if isinstance(layer, _WEIGHTLESS):
            return layer(x)
        raise ValueError(f"the attack model does not support layer {layer.name!r} ({type(layer).__name__})")
