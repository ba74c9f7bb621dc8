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
    `latent` holds the adaptive attacker's lock parameters (empty otherwise)."""
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


def client_loss(labels, logits):
    """The clients' loss (mean sparse CE on logits); soft label logits [N, K] give the same mean CE
    against softmax(labels), which equals it for one-hot labels."""
    if labels.dtype.is_integer:
        return training.classification_loss()(labels, logits)
    # Written out: tf.nn.softmax_cross_entropy_with_logits passes no second-order gradient to labels.
    return tf.reduce_mean(-tf.reduce_sum(tf.nn.softmax(labels) * tf.nn.log_softmax(logits), axis=-1))
