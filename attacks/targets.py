"""What the attacker inverts: a single-step gradient or a multi-step FedAvg update, and the victim
side that produces them (a client's real Keras model, left unchanged).

A `Target` holds, per trainable shared variable (in `ServerView` order), the gradient the client
computed or the weight delta it uploaded, plus the facts a FedAvg server has (number of examples)
and the client hyperparameters an attacker assumes (from the capture's meta).
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

from tfkl import capture as capture_lib
from tfkl import private, training
from tfkl.optimizers import TorchSGD

KINDS = ("gradient", "update")


@dataclasses.dataclass(frozen=True)
class Target:
    """One client's shared gradient (kind 'gradient') or shared update (kind 'update').

    `values` covers the trainable shared variables only (the view's `trainable` mask selects them).
    For updates, `batch_size`, `local_epochs` and the SGD settings describe the client's local
    training as the attacker assumes it (momentum buffers start at zero)."""
    kind: str
    values: tuple
    num_examples: int
    batch_size: int
    local_epochs: int = 1
    learning_rate: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    @property
    def steps_per_epoch(self):
        return int(math.ceil(self.num_examples / self.batch_size))

    @property
    def num_steps(self):
        return self.steps_per_epoch * self.local_epochs


def _trainable_shared(model):
    return [v for v in private.shared_variables(model) if v.trainable]


def client_gradient(model, images, labels):
    """The victim's single-step gradient of the clients' loss on its shared trainable variables.

    Computed in train mode, as clients train; the model's moving statistics are restored after."""
    state = [v.numpy() for v in model.non_trainable_variables]
    variables = _trainable_shared(model)
    with tf.GradientTape() as tape:
        loss = training.classification_loss()(labels, model(images, training=True))
    gradients = tape.gradient(loss, variables)
    for variable, value in zip(model.non_trainable_variables, state):
        variable.assign(value)
    return Target("gradient", tuple(g.numpy() for g in gradients), int(images.shape[0]), int(images.shape[0]))


def client_update_capture(model, images, labels, path, batch_size, local_epochs=1, learning_rate=0.01,
                          momentum=0.9, nesterov=True, weight_decay=5e-4, round_num=0, client_id="0", **meta):
    """Runs a client's local epochs (TorchSGD, fresh state, fixed batch order) on a copy of `model`
    and writes the captured update to `path` in the `tfkl.capture` format. Returns the capture."""
    client = tf.keras.models.clone_model(model)
    client.set_weights(model.get_weights())
    optimizer = TorchSGD(learning_rate, momentum, nesterov, weight_decay) if momentum else TorchSGD(
        learning_rate, 0.0, False, weight_decay)
    trainer = training.Trainer(client, optimizer)
    global_weights = [v.numpy() for v in private.shared_variables(model)]
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
    for _ in range(local_epochs):
        trainer.fit_epoch(dataset)
    shared = private.shared_variables(client)
    update = [v.numpy() - g for v, g in zip(shared, global_weights)]
    steps = int(math.ceil(len(images) / batch_size)) * local_epochs
    meta = dict(meta, round=round_num, client_id=client_id, model=meta.get("model", model.name.replace("_locked", "")),
                input_shape=list(model.input_shape[1:]), num_classes=int(model.output_shape[-1]),
                lock=bool(private.lock_layers(model)), num_examples=int(len(images)), num_steps=steps,
                batch_size=int(batch_size), local_epochs=int(local_epochs), learning_rate=float(learning_rate),
                momentum=float(momentum), nesterov=bool(nesterov), weight_decay=float(weight_decay),
                loss="sparse_categorical_crossentropy_from_logits_mean",
                variable_names=[v.name for v in shared], trainable=[bool(v.trainable) for v in shared])
    capture_lib.save_capture(path, meta, global_weights, update)
    return capture_lib.load_capture(path)


def from_capture(capture):
    """The update `Target` of a capture file (its trainable entries) with the meta's hyperparameters."""
    meta = capture.meta
    values = tuple(np.asarray(u) for u, t in zip(capture.update, meta["trainable"]) if t)
    target = Target("update", values, int(meta["num_examples"]), int(meta["batch_size"]),
                    int(meta.get("local_epochs", 1)), float(meta["learning_rate"]),
                    float(meta.get("momentum", 0.9)), bool(meta.get("nesterov", True)),
                    float(meta.get("weight_decay", 5e-4)))
    if target.num_steps != int(meta["num_steps"]):
        raise ValueError(f"capture meta says {meta['num_steps']} local steps, but {target.num_examples} "
                         f"examples in batches of {target.batch_size} for {target.local_epochs} epochs "
                         f"give {target.num_steps}")
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
            loss = client_loss(y, attacker(full, x, locks))
        return tape.gradient(loss, weights + lock_weights)

    if target.kind == "gradient":
        return gradients(weights, lock_weights, images, labels)[:len(weights)]
    optimizer = TorchSGD(target.learning_rate, target.momentum, target.nesterov and target.momentum > 0,
                         target.weight_decay) if target.momentum > 0 else TorchSGD(
        target.learning_rate, 0.0, False, target.weight_decay)
    params = weights + lock_weights
    state = optimizer.initialize([tf.TensorSpec(p.shape, p.dtype) for p in params])
    start = list(weights)
    for _ in range(target.local_epochs):
        for step in range(target.steps_per_epoch):
            batch = slice(step * target.batch_size, (step + 1) * target.batch_size)
            grads = gradients(params[:len(weights)], params[len(weights):], images[batch], labels[batch])
            state, params = optimizer.next(state, params, grads)
            params = list(params)
    return [p - s for p, s in zip(params[:len(weights)], start)]


def client_loss(labels, logits):
    """The clients' loss (mean sparse CE on logits); soft label logits [N, K] give the same mean CE
    against softmax(labels), which equals it for one-hot labels."""
    if labels.dtype.is_integer:
        return training.classification_loss()(labels, logits)
    # Written out: tf.nn.softmax_cross_entropy_with_logits passes no second-order gradient to labels.
    return tf.reduce_mean(-tf.reduce_sum(tf.nn.softmax(labels) * tf.nn.log_softmax(logits), axis=-1))
