"""A FedKL/FedAvg round's client work and server update in plain TensorFlow (no TFF).

As in TFF's stateful-clients example, these functions hold the algorithm and `algorithms` places
them with TFF. A client's private state is an OrderedDict:
  key: [its key] (FedKL; one key serves every lock of the model) or [] (FedAvg),
  lock: its lock weights (see `ModelParts.split`), [] for FedAvg,
  optimizer: its optimizer's momentum buffers for all its trainable variables (lock included), or []
    when the optimizer starts afresh each round,
  statistics: its own moving statistics, or [] when it uses the server's averaged ones.
`client_update` trains from the server's shared weights and returns the new private state next to
the shared update it sends; `server_update` applies the mean shared update to the server state.
"""

import collections
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tfkl import keys, private
from tfkl.optimizers import LEARNING_RATE, MOMENTUM_BUFFERS
from tfkl.training import classification_loss


class ModelParts:
    """Index positions of a model's variables in the private/shared split (stable per model_fn)."""

    def __init__(self, model):
        priv = {id(v) for v in private.private_variables(model)} if private.lock_layers(model) else set()
        self.trainable = [i for i, v in enumerate(model.trainable_variables) if id(v) not in priv]
        self.non_trainable = [i for i, v in enumerate(model.non_trainable_variables) if id(v) not in priv]
        self.locked = bool(priv)

    def split(self, model):
        """(shared trainable, shared non-trainable, keys, lock weights) variables of `model`.

        Keys: every lock's key variable (a client sets the same key in all of them); lock weights:
        each lock's `lock_weights` in turn."""
        trainable, non_trainable = model.trainable_variables, model.non_trainable_variables
        shared_t = [trainable[i] for i in self.trainable]
        shared_n = [non_trainable[i] for i in self.non_trainable]
        locks = private.lock_layers(model)
        return (
            shared_t,
            shared_n,
            [lock.key for lock in locks],
            [w for lock in locks for w in lock.lock_weights],
        )


def initial_client_state(model, key=None, lock=None, *, persist_optimizer_state, keep_statistics):
    """A client's first private state (numpy): its `key` (FedKL), `lock` weights of its own or else
    `model`'s (as in the paper), zero momentum buffers and `model`'s statistics (when it keeps them)."""
    return initial_client_state_fn(
        model, persist_optimizer_state=persist_optimizer_state, keep_statistics=keep_statistics
    )(key, lock)


def initial_client_state_fn(model, *, persist_optimizer_state, keep_statistics):
    """`initial_client_state` of `model` as a function of (key, lock): `model` is read once (its lock
    weights and statistics, its buffers' shapes), not per client (that costs milliseconds each)."""
    _, shared_n, key_vars, lock_vars = ModelParts(model).split(model)
    key_dim = key_vars[0].shape[0] if key_vars else None
    model_lock = [v.numpy() for v in lock_vars]
    buffers = [(v.shape, v.dtype.as_numpy_dtype) for v in model.trainable_variables] if persist_optimizer_state else []
    statistics = [v.numpy() for v in shared_n] if keep_statistics else []

    def initial(key=None, lock=None):
        if bool(key_vars) == (key is None):
            raise ValueError("a FedKL client needs a key" if key_vars else "a FedAvg client has no key")
        if lock is not None and [np.shape(w) for w in lock] != [w.shape for w in model_lock]:
            raise ValueError(
                f"lock weights of shapes {[np.shape(w) for w in lock]} do not fit the model's "
                f"{[w.shape for w in model_lock]}"
            )
        return collections.OrderedDict(
            key=[keys.validate_key(key, key_dim)] if key_vars else [],
            lock=[np.array(a, np.float32) for a in (model_lock if lock is None else lock)],
            optimizer=[np.zeros(shape, dtype) for shape, dtype in buffers],
            statistics=[np.array(a) for a in statistics],
        )

    return initial


def throwaway_key(dim, seed, distribution):
    """A key of the run's `distribution` (see `tfkl.generate_key`) from TF's stateless RNG under `seed`
    (shape [2] int64): the random-key penalty's fresh keys, drawn inside the client computation.
    Not secrets (never stored, never sent), so a stateless RNG is enough; the CSPRNG is for keys that are."""
    if distribution == "gaussian":
        return tf.random.stateless_normal([dim], seed)
    if distribution == "rademacher":
        return 2.0 * tf.cast(tf.random.stateless_uniform([dim], seed, 0, 2, tf.int32), tf.float32) - 1.0
    if distribution == "uniform":
        return tf.random.stateless_uniform([dim], seed)
    raise ValueError(f"key distribution must be one of {keys.KEY_DISTRIBUTIONS}, got {distribution!r}")


def uniform_divergence(logits):
    """Mean over the batch of KL(uniform || softmax(logits)): 0 when every prediction is uniform.

    Its gradient in the logits, `softmax(logits) - 1/C`, does not vanish for confident predictions
    (the entropy's does), so it keeps pushing a confident answer under a wrong key towards chance.
    """
    log_probs = tf.nn.log_softmax(logits)
    classes = tf.cast(tf.shape(logits)[-1], logits.dtype)
    return -tf.reduce_mean(log_probs) - tf.math.log(classes)


_NOISE_STREAM = 0x6E6F6973  # folded into the round's seed for the lock's noise (the penalty folds in step numbers)


def _penalty_seed(key, global_weights):
    """The stateless seed of a client's round: distinct per client (its key) and round (the broadcast
    shared weights), reproducible with seeded keys; steps fold their index in."""
    parts = [tf.reshape(key, [1, -1]), tf.reshape(global_weights["trainable"][0], [1, -1])]
    return tf.concat([tf.bitcast(tf.fingerprint(p), tf.int64) for p in parts], axis=0)


class ClientOutput(NamedTuple):
    """What `client_update` returns.

    update: the shared update (OrderedDict trainable=..., non_trainable=... deltas; no statistics
      delta when the client keeps its own), zero when rejected; it goes to the aggregator,
    weight: its aggregation weight (examples or 1; 0 when rejected or without data),
    client_state: the new private state (the old one when rejected); it stays at the client,
    metrics: sums over the accepted clients (loss_sum, correct, num_examples, clients_accepted,
      clients_rejected),
    report: num_examples, num_steps and accepted, for the driver.
    """

    update: collections.OrderedDict
    weight: tf.Tensor
    client_state: collections.OrderedDict
    metrics: collections.OrderedDict
    report: collections.OrderedDict


@tf.function  # automatic control dependencies order the assignments, the steps and the reads
def client_update(
    model,
    optimizer,
    global_weights,
    learning_rate,
    dataset,
    state,
    *,
    weight_by_examples,
    update_transform=None,
    random_key_penalty=0.0,
    key_distribution="uniform",
):
    """Trains `model` on `dataset` from the server's shared weights with the client's private `state`.

    Args:
      model: a new Keras model from the process's model_fn (its variables are overwritten).
      optimizer: a `tfkl.optimizers.TorchSGD` (protocol initialize/next with momentum buffers).
      global_weights: OrderedDict(trainable=..., non_trainable=...) of the shared weights.
      learning_rate: this round's learning rate (scalar).
      dataset: the client's batches of (images, labels).
      state: the client's private state (see the module docstring); what it holds decides whether
        the momentum buffers persist and whether the moving statistics stay local.
      weight_by_examples: weight the update by the client's examples (else 1).
      update_transform: applied to the shared update before it is sent (e.g. `prune_smallest`).
      random_key_penalty: FedKL: with a positive weight, each step adds weight x
        `random_key_divergence` under a fresh key of `key_distribution` (`throwaway_key`, seeded
        per client, round and step), so that the model learns to answer a key not its own with
        chance. The reported loss stays the classification loss.

    Returns:
      A `ClientOutput`. A client whose update, new state or loss is not finite is rejected
      (`reject_non_finite`): zero update and weight, its old state kept.
    """
    trainable, non_trainable, key_vars, lock_vars = ModelParts(model).split(model)
    keep_statistics = bool(state["statistics"])
    persist_optimizer_state = bool(state["optimizer"])
    if random_key_penalty > 0 and not key_vars:
        raise ValueError("random_key_penalty needs a model with a key (FedKL)")
    _load_client_model(trainable, non_trainable, key_vars, lock_vars, global_weights, state)
    _draw_round_noise(model, state["key"][0] if key_vars else None, global_weights)
    if persist_optimizer_state:
        buffers = list(state["optimizer"])
    else:
        specs = [tf.TensorSpec(v.shape, v.dtype) for v in model.trainable_variables]
        buffers = optimizer.initialize(specs)[MOMENTUM_BUFFERS]
    penalty = None
    if random_key_penalty > 0:
        penalty = _random_key_penalty(
            random_key_penalty, key_distribution, key_vars, non_trainable, state["key"][0], global_weights
        )
    buffers, sums = _train(model, optimizer, learning_rate, dataset, buffers, penalty)
    update = collections.OrderedDict(
        trainable=[v - w for v, w in zip(trainable, global_weights["trainable"])],
        non_trainable=[]
        if keep_statistics
        else [v - w for v, w in zip(non_trainable, global_weights["non_trainable"])],
    )
    if update_transform is not None:
        update = update_transform(update)
    new_state = collections.OrderedDict(
        key=list(state["key"]),
        lock=[v.read_value() for v in lock_vars],
        optimizer=list(buffers) if persist_optimizer_state else [],
        statistics=[v.read_value() for v in non_trainable] if keep_statistics else [],
    )
    update, new_state, finite = reject_non_finite(update, new_state, state, sums.loss_sum)
    weight, metrics, report = _accounting(sums, finite, weight_by_examples)
    return ClientOutput(update, weight, new_state, metrics, report)


def _load_client_model(trainable, non_trainable, key_vars, lock_vars, global_weights, state):
    """Sets the shared weights from the server and the key, lock and (if it keeps them) statistics of the client."""
    for variable, value in zip(trainable, global_weights["trainable"]):
        variable.assign(value)
    own_statistics = state["statistics"] if state["statistics"] else global_weights["non_trainable"]
    own_keys = list(state["key"]) * len(key_vars)
    for variable, value in zip(
        non_trainable + key_vars + lock_vars, list(own_statistics) + own_keys + list(state["lock"])
    ):
        variable.assign(value)


def _draw_round_noise(model, own_key, global_weights):
    """Draws each noisy lock's noise of the round (`tfkl.KeyLock`'s round_noise) from the stateless seed of the
    client's key and the round's shared weights: reproducible by the client, not by a server without the key."""
    noisy = [lock for lock in private.lock_layers(model) if lock.round_noise > 0]
    if not noisy:
        return
    seed = tf.random.experimental.stateless_fold_in(_penalty_seed(own_key, global_weights), _NOISE_STREAM)
    for index, lock in enumerate(noisy):
        lock.draw_round_noise(tf.random.experimental.stateless_fold_in(seed, index))


class TrainingSums(NamedTuple):
    """What local training adds up over its steps."""

    loss_sum: tf.Tensor  # the classification loss summed over the examples
    correct: tf.Tensor
    num_examples: tf.Tensor
    num_steps: tf.Tensor


def _train(model, optimizer, learning_rate, dataset, buffers, penalty=None):
    """Local training: one optimizer step per batch of `dataset`, from the momentum `buffers`.

    `penalty(model, images, step)`: a term added to each step's objective (see `_random_key_penalty`).
    Returns (the new buffers, `TrainingSums`).
    """
    loss_fn = classification_loss()
    variables = model.trainable_variables

    def step(carry, batch):
        buffers, loss_sum, correct, count, steps = carry
        images, labels = batch
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = loss_fn(labels, logits)
            objective = loss if penalty is None else loss + penalty(model, images, steps)
        gradients = tape.gradient(objective, variables)
        opt_state = {LEARNING_RATE: learning_rate, MOMENTUM_BUFFERS: buffers}
        opt_state, new_weights = optimizer.next(opt_state, [v.read_value() for v in variables], gradients)
        with tf.control_dependencies([v.assign(w) for v, w in zip(variables, new_weights)]):
            n = tf.shape(labels)[0]
            predicted = tf.argmax(logits, axis=-1, output_type=labels.dtype)
            return (
                tuple(opt_state[MOMENTUM_BUFFERS]),
                loss_sum + loss * tf.cast(n, tf.float32),
                correct + tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.int64)),
                count + tf.cast(n, tf.int64),
                steps + 1,
            )

    zero = tf.constant(0, tf.int64)
    buffers, *sums = dataset.reduce((tuple(buffers), tf.constant(0.0), zero, zero, zero), step)
    return buffers, TrainingSums(*sums)


def _random_key_penalty(weight, distribution, key_vars, statistics_vars, own_key, global_weights):
    """The random-key penalty of a client's round as `penalty(model, images, step)`: `weight` x
    `random_key_divergence` under the step's `throwaway_key` (seeded per client, round and step)."""
    round_seed = _penalty_seed(own_key, global_weights)
    key_dim = key_vars[0].shape[0]

    def penalty(model, images, step):
        fresh_key = throwaway_key(key_dim, tf.random.experimental.stateless_fold_in(round_seed, step), distribution)
        return weight * random_key_divergence(model, images, fresh_key, key_vars, statistics_vars, own_key)

    return penalty


def random_key_divergence(model, images, fresh_key, key_vars, statistics_vars, own_key):
    """`uniform_divergence` of `model`'s train-mode logits of `images` under `fresh_key` (set in `key_vars`).

    That pass moves the moving statistics (`statistics_vars`): they are put back, and the keys set to
    `own_key` again, so the model leaves as it came (automatic control dependencies order the
    reads and assignments, in a `tf.function`, as written).
    """
    statistics = [v.read_value() for v in statistics_vars]
    for variable in key_vars:
        variable.assign(fresh_key)
    wrong_logits = model(images, training=True)
    for variable, value in zip(key_vars + statistics_vars, [own_key] * len(key_vars) + statistics):
        variable.assign(value)
    return uniform_divergence(wrong_logits)


def reject_non_finite(update, new_state, old_state, loss_sum):
    """(update, state, finite): `update` and `new_state` when they and `loss_sum` are all finite, else
    a zero update and `old_state` (a client whose training diverged or whose data hold NaN)."""
    values = tf.nest.flatten(update) + tf.nest.flatten(new_state) + [loss_sum]
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in values])
    update = tf.nest.map_structure(lambda u: tf.where(finite, u, tf.zeros_like(u)), update)
    new_state = tf.nest.map_structure(lambda n, o: tf.where(finite, n, o), new_state, old_state)
    return update, new_state, finite


def _accounting(sums, finite, weight_by_examples):
    """(aggregation weight, metric sums, report) of a client (see `ClientOutput`)."""
    count = sums.num_examples
    base_weight = tf.cast(count, tf.float32) if weight_by_examples else tf.constant(1.0)
    weight = tf.where(finite & (count > 0), base_weight, 0.0)
    accepted = tf.cast(weight > 0, tf.int64)
    metrics = collections.OrderedDict(
        loss_sum=tf.where(finite, sums.loss_sum, 0.0) * tf.cast(accepted, tf.float32),
        correct=sums.correct * accepted,
        num_examples=count * accepted,
        clients_accepted=accepted,
        clients_rejected=1 - accepted,
    )
    report = collections.OrderedDict(num_examples=count, num_steps=sums.num_steps, accepted=accepted > 0)
    return weight, metrics, report


def initial_server_state(model, server_optimizer):
    """The server's first state: `model`'s shared weights, the optimizer's state and round 0."""
    trainable, non_trainable, _, _ = ModelParts(model).split(model)
    return collections.OrderedDict(
        trainable=[v.read_value() for v in trainable],
        non_trainable=[v.read_value() for v in non_trainable],
        optimizer=server_optimizer.initialize([tf.TensorSpec(v.shape, v.dtype) for v in trainable]),
        round_num=tf.constant(0, tf.int32),
    )


def server_update(server_optimizer, server_state, mean_update):
    """Applies the clients' mean shared update to the server state (its keys as `initial_server_state`).

    The server optimizer takes the negated mean update as its gradient (SGD(1.0) is FedAvg); the
    mean statistics delta is added to the statistics; without one (statistics kept local) they stay.
    """
    opt_state, new_weights = server_optimizer.next(
        server_state["optimizer"], list(server_state["trainable"]), [-u for u in mean_update["trainable"]]
    )
    if mean_update["non_trainable"]:
        non_trainable = [w + u for w, u in zip(server_state["non_trainable"], mean_update["non_trainable"])]
    else:
        non_trainable = list(server_state["non_trainable"])
    return collections.OrderedDict(
        trainable=list(new_weights),
        non_trainable=non_trainable,
        optimizer=opt_state,
        round_num=server_state["round_num"] + 1,
    )


def round_metrics(metric_sums):
    """The round's metrics from the sums of the clients' `ClientOutput.metrics`."""
    examples = tf.cast(tf.maximum(metric_sums["num_examples"], 1), tf.float32)
    return collections.OrderedDict(
        loss=metric_sums["loss_sum"] / examples,
        accuracy=tf.cast(metric_sums["correct"], tf.float32) / examples,
        num_examples=metric_sums["num_examples"],
        clients_accepted=metric_sums["clients_accepted"],
        clients_rejected=metric_sums["clients_rejected"],
    )
