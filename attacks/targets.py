"""What the attacker inverts: a single-step gradient or a multi-step FedAvg update (the victims that
produce them are in `attacks.cases`), and the attacker's differentiable prediction of it.

A `Target` holds, per trainable shared variable (in `ServerView` order), the gradient the client
computed or the weight delta it uploaded, plus the facts a FedAvg server has (number of examples)
and the client hyperparameters an attacker assumes (from the capture's meta).
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

from tfkl import training
from tfkl.optimizers import TorchSGD


@dataclasses.dataclass(frozen=True)
class Target:
    """One client's shared gradient (kind 'gradient') or shared update (kind 'update').

    `values` covers the trainable shared variables only (the view's `trainable` mask selects them).
    For updates, `batch_size`, `local_epochs` and the SGD settings describe the client's local
    training as the attacker assumes it (momentum buffers start at zero). `pruned`: the client zeroed
    the smallest entries of what it sent (gradient pruning); the attacker, who knows the protocol,
    matches the entries it kept (the nonzero ones) only. `training`: the client's model ran in training
    mode (BatchNorm normalises by the batch's statistics), as clients train; False: inference mode (the
    moving statistics), as Inverting Gradients computes its victims' gradients (`model.eval()`)."""

    kind: str
    values: tuple
    num_examples: int
    batch_size: int
    local_epochs: int = 1
    learning_rate: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    pruned: bool = False
    training: bool = True

    @property
    def steps_per_epoch(self):
        return int(math.ceil(self.num_examples / self.batch_size))

    @property
    def num_steps(self):
        return self.steps_per_epoch * self.local_epochs

    def settings(self):
        """Everything but the values: what a compiled attack on this target depends on."""
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "values")


@dataclasses.dataclass(frozen=True)
class Pooled:
    """K captures of one client attacked together (a server that watches a client over rounds).

    Each member's images (and labels) are unknowns of their own, in member order; the lock's unknowns (the
    adaptive threats' latents) are shared. With `drift` > 0 each member also gets its own offset of those
    latents, penalised by `drift` times its mean square (the lock moves as the client trains).

    members: the K `Target`s (one kind, size and set of client hyperparameters).
    weights: per member, the global shared weights (every view variable, in view order) it was computed on.
    lock_weights: per member, the secret 'oracle' or 'adaptive-key' takes (`cases.threat_secret`: the client
      trains its lock weights between rounds); None: the attacker's own for every member.
    holdout, seed: the share of each member's entries left out of the fit (drawn from `seed`); the attack
      reports its distance on them as `held_out_loss`, which compares drift strengths without the truth.
    orders: None (each member's images its own), or a client that trains the same images every round: one
      shared set of images (and labels), member k training on them in the order orders[k] (a permutation of
      the shared set's indices; the attacker's assumption, e.g. `attacks.pooled.label_orders`).
    """

    members: tuple
    weights: tuple
    lock_weights: tuple | None = None
    drift: float = 0.0
    holdout: float = 0.0
    seed: int = 0
    orders: tuple | None = None

    def __post_init__(self):
        if not self.members or len(self.weights) != len(self.members):
            raise ValueError("a pool needs at least one member and one set of global weights per member")
        if self.lock_weights is not None and len(self.lock_weights) != len(self.members):
            raise ValueError("lock_weights: one entry per member, or None")
        if len({member.settings() for member in self.members}) != 1:
            raise ValueError("the pooled targets differ in kind, size or client hyperparameters")
        if not (self.drift >= 0 and 0 <= self.holdout < 1):
            raise ValueError(f"drift must be >= 0 and holdout in [0, 1), got {self.drift}, {self.holdout}")
        n = self.member.num_examples
        if self.orders is not None and (
            len(self.orders) != len(self.members) or any(sorted(order) != list(range(n)) for order in self.orders)
        ):
            raise ValueError(f"orders: one permutation of range({n}) per member, or None")

    @property
    def count(self):
        return len(self.members)

    @property
    def member(self):
        return self.members[0]

    kind = property(lambda self: self.member.kind)
    batch_size = property(lambda self: self.member.batch_size)
    learning_rate = property(lambda self: self.member.learning_rate)
    pruned = property(lambda self: self.member.pruned)
    training = property(lambda self: self.member.training)

    @property
    def num_examples(self):
        """The images the attack searches: the members' own, or with `orders` the one shared set."""
        return self.member.num_examples * (1 if self.orders is not None else self.count)

    def member_examples(self, k, images, labels):
        """Member k's (images, labels) in its training order, of the pool's (images, labels) unknowns."""
        if self.orders is not None:
            return tf.gather(images, self.orders[k]), tf.gather(labels, self.orders[k])
        n = self.member.num_examples
        return images[k * n : (k + 1) * n], labels[k * n : (k + 1) * n]

    @property
    def values(self):
        """The members' values, member after member."""
        return tuple(value for member in self.members for value in member.values)

    def settings(self):
        orders = None if self.orders is None else tuple(tuple(int(i) for i in order) for order in self.orders)
        return ("pooled", self.count, self.drift, self.holdout, self.seed, self.lock_weights is not None, orders) + (
            self.member.settings()
        )

    def held_out(self, index, shape):
        """[shape] bools: the entries of value `index` (of `values`) left out of the fit."""
        rng = np.random.default_rng([self.seed, index])
        return rng.random(shape) < self.holdout


def from_capture(capture):
    """The update `Target` of a capture file (its trainable entries) with the meta's hyperparameters."""
    meta = capture.meta
    values = tuple(np.asarray(u) for u, t in zip(capture.update, meta["trainable"]) if t)
    target = Target(
        "update",
        values,
        int(meta["num_examples"]),
        int(meta["batch_size"]),
        int(meta["local_epochs"]),
        float(meta["learning_rate"]),
        float(meta["momentum"]),
        bool(meta["nesterov"]),
        float(meta["weight_decay"]),
    )
    if target.num_steps != int(meta["num_steps"]):
        raise ValueError(
            f"capture meta says {meta['num_steps']} local steps, but {target.num_examples} "
            f"examples in batches of {target.batch_size} for {target.local_epochs} epochs "
            f"give {target.num_steps}"
        )
    return target


def simulate(attacker, target, images, labels, latent):
    """The attacker's prediction of `target` for candidate data (one problem), differentiable.

    `labels` are integer labels [N] or label logits [N, classes] (soft labels, softmax'd);
    `latent` holds the adaptive attacker's lock parameters (empty otherwise). A `Pooled` target: see
    `simulate_pooled`."""
    if isinstance(target, Pooled):
        return simulate_pooled(attacker, target, images, labels, latent)
    index = [i for i, t in enumerate(attacker.trainable) if t]
    weights = [tf.identity(attacker.weights[i]) for i in index]
    lock_weights = list(attacker.trainable_lock_weights())

    def gradients(weights, lock_weights, x, y):
        with tf.GradientTape() as tape:
            tape.watch(weights + lock_weights)
            full = list(attacker.weights)
            for i, w in zip(index, weights):
                full[i] = w
            locks = attacker.lock_values(latent, attacker.pack_lock_weights(lock_weights) if lock_weights else None)
            loss = client_loss(y, attacker(full, x, locks, training=target.training))
        return tape.gradient(loss, weights + lock_weights)

    if target.kind == "gradient":
        return gradients(weights, lock_weights, images, labels)[: len(weights)]
    optimizer = (
        TorchSGD(target.learning_rate, target.momentum, target.nesterov and target.momentum > 0, target.weight_decay)
        if target.momentum > 0
        else TorchSGD(target.learning_rate, 0.0, False, target.weight_decay)
    )
    params = weights + lock_weights
    state = optimizer.initialize([tf.TensorSpec(p.shape, p.dtype) for p in params])
    start = list(weights)
    for _ in range(target.local_epochs):
        for step in range(target.steps_per_epoch):
            batch = slice(step * target.batch_size, (step + 1) * target.batch_size)
            grads = gradients(params[: len(weights)], params[len(weights) :], images[batch], labels[batch])
            state, params = optimizer.next(state, params, grads)
            params = list(params)
    return [p - s for p, s in zip(params[: len(weights)], start)]


def simulate_pooled(attacker, pooled, images, labels, latent):
    """The prediction of each member of `pooled`, member after member, while the attacker is bound to the
    pool's stacked tensors (`pooled_tensors`): member k from its images and labels, its round's global
    weights, its lock weights and the shared lock latents (plus its drift offset)."""
    size = attacker.lock_latent_size()
    stacked_weights, stacked_locks = attacker.weights, attacker.lock_weights
    predicted = []
    for k, member in enumerate(pooled.members):
        member_latent = latent[:size]
        if pooled.drift:
            member_latent = member_latent + latent[size * (k + 1) : size * (k + 2)]
        lock_weights = stacked_locks
        if pooled.lock_weights is not None:
            lock_weights = {name: tuple(v[k] for v in values) for name, values in stacked_locks.items()}
        with attacker.bound(([w[k] for w in stacked_weights], lock_weights)):
            predicted += simulate(attacker, member, *pooled.member_examples(k, images, labels), member_latent)
    return predicted


def pooled_tensors(attacker, pooled):
    """The attacker's tensors for a compiled attack on `pooled`: each shared weight and (if the pool has
    them) each known lock weight stacked over the members, [K, ...]."""
    weights = [tf.constant(np.stack([w[i] for w in pooled.weights]), tf.float32) for i in range(len(attacker.weights))]
    lock_weights = attacker.lock_weights
    if pooled.lock_weights is not None:
        members = [attacker.lock_weights_from(secret) for secret in pooled.lock_weights]
        lock_weights = {
            name: tuple(tf.stack(parts) for parts in zip(*(m[name] for m in members))) for name in members[0]
        }
    return weights, lock_weights


def client_loss(labels, logits):
    """The clients' loss (mean sparse CE on logits); soft label logits [N, K] give the same mean CE
    against softmax(labels), which equals it for one-hot labels."""
    if labels.dtype.is_integer:
        return training.classification_loss()(labels, logits)
    # Written out: tf.nn.softmax_cross_entropy_with_logits passes no second-order gradient to labels.
    return tf.reduce_mean(-tf.reduce_sum(tf.nn.softmax(labels) * tf.nn.log_softmax(logits), axis=-1))
