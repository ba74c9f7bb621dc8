"""Victim clients (cases), kept apart from the attacks as breaching keeps its cases.

A case gives what the server sees of its clients, the `Payload` (the server's view of the model and one
`Target` per client: a single-step gradient, or the update of a capture file), and separately the
clients' true data (`UserData`), which only scoring reads. An attack receives the payload, and a
secret only under the threats that assume one (`threat_secret`).
"""

import dataclasses
import math
import os

import numpy as np
import tensorflow as tf

from attacks import model as model_lib
from attacks import targets as targets_lib
from tfkl import capture as capture_lib
from tfkl import data, models, private
from tfkl import keys as keys_lib
from tfkl import training as training_lib
from tfkl.optimizers import TorchSGD


@dataclasses.dataclass(frozen=True)
class Payload:
    """What a curious server holds of a case: its view of the model and one target per client."""

    view: model_lib.ServerView
    targets: tuple

    @classmethod
    def from_capture(cls, capture):
        """A capture's payload: the view it rebuilds and its update target."""
        return cls(model_lib.ServerView.from_capture(capture), (targets_lib.from_capture(capture),))


@dataclasses.dataclass(frozen=True)
class UserData:
    """The clients' true data, for scoring only: images [N, H, W, C] in [0, 1] and labels [N], client
    after client; for a federated capture also the (images, labels) batches the client trained on in
    its round (all local epochs, in training order)."""

    images: np.ndarray
    labels: np.ndarray
    batches: list = None


def build_victims(
    model_name,
    input_shape,
    num_classes,
    init="pytorch",
    seed=0,
    normalization="batch",
    key_seed=1,
    threats=model_lib.THREATS,
):
    """{'plain': backbone, 'locked': the same backbone with the lock} (only those `threats` need)."""
    victims = {}
    if "none" in threats:
        victims["plain"] = models.build(model_name, input_shape, num_classes, lock=False, init=init, seed=seed)
    if any(t != "none" for t in threats):
        victims["locked"] = models.build(
            model_name,
            input_shape,
            num_classes,
            lock=True,
            init=init,
            seed=seed,
            normalization=normalization,
            key=keys_lib.generate_key(1024, seed=key_seed),
        )
    return victims


def privatize_lock(victim, seed):
    """Replaces the victim's lock weights by privately drawn ones (a client with lock_init='private');
    returns the ones it had, model_fn's, which are all a server knows of them."""
    server_known = model_lib.extract_lock_weights(victim)
    lock_variables = [v for lock in private.lock_layers(victim) for v in lock.private_weights[1:]]
    for variable, value in zip(lock_variables, private.draw_lock_weights(victim, seed=[seed])):
        variable.assign(value)
    return server_known


def threat_secret(threat, victim, server_lock_weights=None):
    """What an attacker under `threat` knows of the victim's secret: key and lock weights ('oracle'),
    the lock weights a server knows ('adaptive-key': the victim's own when clients start from
    model_fn's lock, else `server_lock_weights`, model_fn's), nothing otherwise."""
    if threat == "adaptive-key" and server_lock_weights is not None:
        return server_lock_weights
    extract = {"oracle": model_lib.extract_secret, "adaptive-key": model_lib.extract_lock_weights}.get(threat)
    return extract(victim) if extract else None


def client_gradient(model, images, labels, training=True):
    """The victim's single-step gradient of the clients' loss on its shared trainable variables.

    Computed in train mode, as clients train (`training=False`: inference mode, see `Target.training`);
    the model's moving statistics are restored after."""
    state = [v.numpy() for v in model.non_trainable_variables]
    variables = [v for v in private.shared_variables(model) if v.trainable]
    with tf.GradientTape() as tape:
        loss = training_lib.classification_loss()(labels, model(images, training=training))
    gradients = tape.gradient(loss, variables)
    for variable, value in zip(model.non_trainable_variables, state):
        variable.assign(value)
    n = int(images.shape[0])
    return targets_lib.Target("gradient", tuple(g.numpy() for g in gradients), n, n, training=training)


def client_update_capture(
    model,
    images,
    labels,
    path,
    batch_size,
    local_epochs=1,
    learning_rate=0.01,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    round_num=0,
    client_id="0",
):
    """Runs a client's local epochs (TorchSGD, fresh state, fixed batch order) on a copy of `model`
    and writes the captured update to `path` in the `tfkl.capture` format. Returns the capture."""
    client = tf.keras.models.clone_model(model)
    client.set_weights(model.get_weights())
    optimizer = (
        TorchSGD(learning_rate, momentum, nesterov, weight_decay)
        if momentum
        else TorchSGD(learning_rate, 0.0, False, weight_decay)
    )
    trainer = training_lib.Trainer(client, optimizer)
    global_weights = [v.numpy() for v in private.shared_variables(model)]
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
    for _ in range(local_epochs):
        trainer.fit_epoch(dataset)
    update = [v.numpy() - g for v, g in zip(private.shared_variables(client), global_weights)]
    meta = capture_lib.build_meta(
        model,
        round_num=round_num,
        client_id=client_id,
        num_examples=len(images),
        num_steps=int(math.ceil(len(images) / batch_size)) * local_epochs,
        batch_size=batch_size,
        local_epochs=local_epochs,
        learning_rate=learning_rate,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
    )
    capture_lib.save_capture(path, meta, global_weights, update)
    return capture_lib.load_capture(path)


def simulate_clients(
    victim, images, labels, per_client, kind="gradient", capture_dir=None, training=True, **update_options
):
    """The case of `victim`'s clients, each holding `per_client` consecutive images: (Payload, UserData).

    Each client sends a single-step gradient (kind 'gradient', one batch; `training`: see
    `Target.training`), or the update of locally simulated steps (which train: `training` stays True)
    written as a capture file under `capture_dir` (`update_options`: see `client_update_capture`)."""
    if kind != "gradient" and not training:
        raise ValueError("clients train in training mode: training=False applies to kind 'gradient' only")
    client_targets = []
    for index, start in enumerate(range(0, len(images), per_client)):
        x, y = images[start : start + per_client], labels[start : start + per_client]
        if kind == "gradient":
            client_targets.append(client_gradient(victim, x, y, training))
        else:
            path = os.path.join(capture_dir, f"client_{index:03d}.npz")
            capture = client_update_capture(victim, x, y, path, **update_options)
            client_targets.append(targets_lib.from_capture(capture))
    return Payload(model_lib.ServerView.from_model(victim), tuple(client_targets)), UserData(images, labels)


def capture_user_data(meta, dataset=None, data_dir=None):
    """The true data of a federated capture's client, rebuilt from its meta's `ground_truth` section
    (None without one): its examples of the capture's round in the partition's order (its subset of
    the partition with `examples_per_client`), and the batches it trained on."""
    # The trainer's own pipeline; imported here, as it loads TFF, which attacks otherwise never need.
    from tfkl.federated import client_data
    from tfkl.federated.config import Config

    truth = meta.get("ground_truth")
    if not truth:
        return None
    config = Config(
        dataset=truth["dataset"],
        data_dir=truth["data_dir"],
        input_shape=tuple(meta["input_shape"]),
        num_classes=int(meta["num_classes"]),
        num_clients=int(truth["num_clients"]),
        split=truth["split"],
        alpha=float(truth["alpha"]),
        seed=int(truth["split_seed"]),
        batch_size=int(meta["batch_size"]),
        local_epochs=int(meta["local_epochs"]),
        examples_per_client=truth.get("examples_per_client"),
        fresh_examples=bool(truth.get("fresh_examples", False)),
    )
    dataset = dataset or data.load(config.dataset, data_dir or config.data_dir)
    client = int(truth["client_index"])
    indices = client_data.round_examples(
        config, client_data.client_partition(config, dataset)[client], client, int(meta["round"])
    )
    images = data.preprocess(dataset.x_train[indices], config.input_shape).numpy()
    batches = client_data.client_dataset(config, dataset, indices, int(truth["shuffle_seed"])).as_numpy_iterator()
    return UserData(images, dataset.y_train[indices], list(batches))
