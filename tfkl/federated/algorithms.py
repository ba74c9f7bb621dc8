"""FedKL and FedAvg as TFF computations with private, persistent client state (stateful clients).

TFF's learning algorithms keep no per-client state, so the round follows the stateful-clients
pattern: `next(server_state@SERVER, learning_rate@SERVER, data@CLIENTS, client_state@CLIENTS)`
returns `<server_state@SERVER, client_state@CLIENTS, metrics@SERVER, reports@CLIENTS>`. The client
state holds the key and the lock weights (FedKL), the client optimizer's momentum buffers (when
they persist, as in the paper) and the client's own moving statistics (when they are kept local).
Only the shared update crosses to SERVER: by default an example-weighted sum and its weight
(`tff.federated_sum`), or through a `model_aggregator` (a TFF aggregation factory, e.g. DP-FedAvg's
`tff.aggregators.DifferentiallyPrivateFactory`) whose state lives in the server state. An optional
`client_update_transform` (e.g. `prune_smallest`) changes each client's update before it is sent.
"""

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tfkl import keys, private
from tfkl.optimizers import LEARNING_RATE, MOMENTUM_BUFFERS
from tfkl.training import classification_loss

CLIENT_WEIGHTINGS = ("num_examples", "uniform")
STATISTICS = ("average", "local")


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
        (scale kernel, scale bias, shift kernel, shift bias) of each lock in turn."""
        trainable, non_trainable = model.trainable_variables, model.non_trainable_variables
        shared_t = [trainable[i] for i in self.trainable]
        shared_n = [non_trainable[i] for i in self.non_trainable]
        locks = private.lock_layers(model)
        return (shared_t, shared_n, [lock.key for lock in locks],
                [w for lock in locks for w in (lock.scale_kernel, lock.scale_bias, lock.shift_kernel, lock.shift_bias)])


def prune_smallest(fraction):
    """A client update transform: zeroes the `fraction` smallest-magnitude entries of each tensor
    (DLG's gradient pruning defence): exactly round(fraction * size) entries of each tensor."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the pruned fraction must be in [0, 1), got {fraction}")

    def prune(tensor):
        flat = tf.reshape(tensor, [-1])
        size = flat.shape[0]
        keep = size - int(round(fraction * size))
        if keep == size:
            return tensor
        _, kept = tf.math.top_k(tf.abs(flat), k=keep)
        mask = tf.scatter_nd(kept[:, tf.newaxis], tf.ones([keep], flat.dtype), [size])
        return tf.reshape(flat * mask, tensor.shape)

    return lambda update: tf.nest.map_structure(prune, update)


def _tensor_type(variable):
    return tff.TensorType(variable.dtype.as_numpy_dtype, variable.shape)


def _types(variables):
    return [_tensor_type(v) for v in variables]


class StatefulClientsProcess(tff.templates.IterativeProcess):
    """An iterative process whose clients keep private state between the rounds they take part in.

    Attributes beyond IterativeProcess: `initial_client_state(key, lock=None)` (numpy structure for one
    client; `lock`: its own initial lock weights instead of the model_fn's),
    `client_state_type`, `server_state_type`, `data_type`, `model_fn`, `parts`, `options`, and
    `global_weights(server_state)` (the shared weights as numpy lists).
    """

    def __init__(self, initialize_fn, next_fn, *, model_fn, parts, options, client_state_type, data_type,
                 initial_client_state_fn):
        super().__init__(initialize_fn, next_fn)
        self.model_fn = model_fn
        self.parts = parts
        self.options = options
        self.client_state_type = client_state_type
        self.data_type = data_type
        self._initial_client_state_fn = initial_client_state_fn

    @property
    def server_state_type(self):
        return self.state_type

    def initial_client_state(self, key=None, lock=None):
        return self._initial_client_state_fn(key, lock)

    @staticmethod
    def global_weights(server_state):
        return ([np.asarray(w) for w in server_state["trainable"]],
                [np.asarray(w) for w in server_state["non_trainable"]])


def _build_process(model_fn, client_optimizer, server_optimizer, *, locked, client_weighting,
                   statistics, persist_optimizer_state, return_client_updates, model_aggregator,
                   client_update_transform):
    if client_weighting not in CLIENT_WEIGHTINGS:
        raise ValueError(f"client_weighting must be one of {CLIENT_WEIGHTINGS}, got {client_weighting!r}")
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}")
    if server_optimizer is None:
        server_optimizer = tff.learning.optimizers.build_sgdm(learning_rate=1.0)
    if isinstance(model_aggregator, tff.aggregators.UnweightedAggregationFactory):
        if client_weighting != "uniform":
            raise ValueError("an unweighted model_aggregator (e.g. DP) needs client_weighting='uniform'")
        model_aggregator = tff.aggregators.as_weighted_aggregator(model_aggregator)
    elif model_aggregator is not None and not isinstance(model_aggregator, tff.aggregators.WeightedAggregationFactory):
        raise TypeError(f"model_aggregator must be a TFF aggregation factory, got {type(model_aggregator).__name__}")

    probe = model_fn()
    parts = ModelParts(probe)
    if locked != parts.locked:
        raise ValueError("FedKL needs a model with a KeyLock layer" if locked else
                         "FedAvg takes a model without a KeyLock layer")
    shared_t, shared_n, key_vars, lock_vars = parts.split(probe)
    trainable_all = probe.trainable_variables
    keep_stats = statistics == "local"
    data_type = tff.SequenceType((tff.TensorType(np.float32, (None,) + tuple(probe.input_shape[1:])),
                                  tff.TensorType(np.int64, [None])))

    shared_type = tff.to_type(collections.OrderedDict(trainable=_types(shared_t), non_trainable=_types(shared_n)))
    client_state_type = tff.to_type(collections.OrderedDict(
        key=_types(key_vars[:1]), lock=_types(lock_vars),
        optimizer=_types(trainable_all) if persist_optimizer_state else [],
        statistics=_types(shared_n) if keep_stats else []))
    learning_rate_type = tff.TensorType(np.float32)

    # Every client starts from the model_fn's lock weights and statistics (as in the paper), with its own
    # key, unless it brings lock weights of its own (drawn privately: see KeyLock.draw_lock_weights).
    initial_lock = [v.numpy() for v in lock_vars]
    initial_statistics = [v.numpy() for v in shared_n]

    def initial_client_state(key=None, lock=None):
        if locked == (key is None):
            raise ValueError("a FedKL client needs a key" if locked else "a FedAvg client has no key")
        if lock is not None and [np.shape(w) for w in lock] != [w.shape for w in initial_lock]:
            raise ValueError(f"lock weights of shapes {[np.shape(w) for w in lock]} do not fit the model's "
                             f"{[w.shape for w in initial_lock]}")
        return collections.OrderedDict(
            key=[keys.validate_key(key, key_vars[0].shape[0])] if locked else [],
            lock=[np.array(a, np.float32) for a in (initial_lock if lock is None else lock)],
            optimizer=[np.zeros(v.shape, v.dtype.as_numpy_dtype) for v in trainable_all]
            if persist_optimizer_state else [],
            statistics=[np.copy(a) for a in initial_statistics] if keep_stats else [])

    @tff.tensorflow.computation
    def server_init():
        model = model_fn()
        trainable, non_trainable, _, _ = parts.split(model)
        weights = [v.read_value() for v in trainable]
        return collections.OrderedDict(
            trainable=weights, non_trainable=[v.read_value() for v in non_trainable],
            optimizer=server_optimizer.initialize([tf.TensorSpec(v.shape, v.dtype) for v in trainable]),
            round_num=tf.constant(0, tf.int32))

    update_type = tff.to_type(collections.OrderedDict(
        trainable=_types(shared_t), non_trainable=[] if keep_stats else _types(shared_n)))
    if model_aggregator is None:
        aggregation = None

        @tff.federated_computation
        def initialize_fn():
            return tff.federated_eval(server_init, tff.SERVER)
    else:
        aggregation = model_aggregator.create(update_type, tff.TensorType(np.float32))

        @tff.tensorflow.computation(server_init.type_signature.result, aggregation.state_type.member)
        def with_aggregator(state, aggregator_state):
            return collections.OrderedDict(**state, aggregator=aggregator_state)

        @tff.federated_computation
        def initialize_fn():
            return tff.federated_map(with_aggregator, (tff.federated_eval(server_init, tff.SERVER),
                                                       aggregation.initialize()))

    server_state_type = initialize_fn.type_signature.result.member

    @tff.tensorflow.computation(server_state_type)
    def server_to_client(server_state):
        return collections.OrderedDict(trainable=server_state["trainable"],
                                       non_trainable=server_state["non_trainable"])

    @tff.tensorflow.computation(shared_type, learning_rate_type, data_type, client_state_type)
    def client_update(global_weights, learning_rate, dataset, state):
        model = model_fn()
        trainable, non_trainable, key_v, lock_v = parts.split(model)

        @tf.function  # automatic control dependencies order the assignments, the steps and the reads
        def work(global_weights, learning_rate, dataset, state):
            loss_fn = classification_loss()
            variables = model.trainable_variables
            for variable, value in zip(trainable, global_weights["trainable"]):
                variable.assign(value)
            own_stats = state["statistics"] if keep_stats else global_weights["non_trainable"]
            own_keys = list(state["key"]) * len(key_v)  # one client key serves every lock of the model
            for variable, value in zip(non_trainable + key_v + lock_v,
                                       list(own_stats) + own_keys + list(state["lock"])):
                variable.assign(value)
            if persist_optimizer_state:
                buffers = list(state["optimizer"])
            else:
                buffers = client_optimizer.initialize([tf.TensorSpec(v.shape, v.dtype) for v in variables])[
                    MOMENTUM_BUFFERS]

            def step(carry, batch):
                buffers, loss_sum, correct, count, steps = carry
                images, labels = batch
                with tf.GradientTape() as tape:
                    logits = model(images, training=True)
                    loss = loss_fn(labels, logits)
                gradients = tape.gradient(loss, variables)
                opt_state = {LEARNING_RATE: learning_rate, MOMENTUM_BUFFERS: buffers}
                opt_state, new_weights = client_optimizer.next(opt_state, [v.read_value() for v in variables],
                                                               gradients)
                with tf.control_dependencies([v.assign(w) for v, w in zip(variables, new_weights)]):
                    n = tf.shape(labels)[0]
                    predicted = tf.argmax(logits, axis=-1, output_type=labels.dtype)
                    return (tuple(opt_state[MOMENTUM_BUFFERS]), loss_sum + loss * tf.cast(n, tf.float32),
                            correct + tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.int64)),
                            count + tf.cast(n, tf.int64), steps + 1)

            buffers, loss_sum, correct, count, steps = dataset.reduce(
                (tuple(buffers), tf.constant(0.0), tf.constant(0, tf.int64), tf.constant(0, tf.int64),
                 tf.constant(0, tf.int64)), step)
            update = collections.OrderedDict(
                trainable=[v - w for v, w in zip(trainable, global_weights["trainable"])],
                non_trainable=[] if keep_stats else
                [v - w for v, w in zip(non_trainable, global_weights["non_trainable"])])
            if client_update_transform is not None:
                update = client_update_transform(update)
            new_state = collections.OrderedDict(
                key=list(state["key"]), lock=[v.read_value() for v in lock_v],
                optimizer=list(buffers) if persist_optimizer_state else [],
                statistics=[v.read_value() for v in non_trainable] if keep_stats else [])
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in
                                    tf.nest.flatten(update) + tf.nest.flatten(new_state) + [loss_sum]])
            # A non-finite client is rejected: zero weight, zero contribution, its old state kept.
            update = tf.nest.map_structure(lambda u: tf.where(finite, u, tf.zeros_like(u)), update)
            new_state = tf.nest.map_structure(lambda n, o: tf.where(finite, n, o), new_state, state)
            base_weight = tf.cast(count, tf.float32) if client_weighting == "num_examples" else tf.constant(1.0)
            weight = tf.where(finite & (count > 0), base_weight, 0.0)
            accepted = tf.cast(weight > 0, tf.int64)
            if aggregation is None:
                sent = collections.OrderedDict(update=tf.nest.map_structure(lambda u: u * weight, update),
                                               weight=weight)
            else:
                sent = collections.OrderedDict(update=update, weight=weight)
            metrics = collections.OrderedDict(
                loss_sum=tf.where(finite, loss_sum, 0.0) * tf.cast(accepted, tf.float32),
                correct=correct * accepted, num_examples=count * accepted, clients_accepted=accepted,
                clients_rejected=1 - accepted)
            report = collections.OrderedDict(num_examples=count, num_steps=steps, accepted=accepted > 0,
                                             update=update if return_client_updates else collections.OrderedDict(
                                                 trainable=[], non_trainable=[]))
            return sent, new_state, metrics, report

        return work(global_weights, learning_rate, dataset, state)

    sent_type = client_update.type_signature.result[0]
    metrics_type = client_update.type_signature.result[2]

    @tff.tensorflow.computation(sent_type)
    def weighted_mean(weighted_sum):
        total = weighted_sum["weight"]
        safe_total = tf.maximum(total, 1e-12)
        return tf.nest.map_structure(lambda s: tf.where(total > 0, s / safe_total, tf.zeros_like(s)),
                                     weighted_sum["update"])

    @tff.tensorflow.computation(server_state_type, update_type, metrics_type)
    def server_update(server_state, mean, metrics):
        weights = list(server_state["trainable"])
        # The server optimizer takes the negated mean update as its gradient: SGD(1.0) is FedAvg.
        opt_state, new_weights = server_optimizer.next(server_state["optimizer"], weights,
                                                       [-u for u in mean["trainable"]])
        if keep_stats:
            non_trainable = list(server_state["non_trainable"])
        else:
            non_trainable = [w + u for w, u in zip(server_state["non_trainable"], mean["non_trainable"])]
        new_state = collections.OrderedDict(
            trainable=list(new_weights), non_trainable=non_trainable, optimizer=opt_state,
            round_num=server_state["round_num"] + 1)  # the aggregator's new state is added by next_fn
        examples = tf.maximum(metrics["num_examples"], 1)
        round_metrics = collections.OrderedDict(
            loss=metrics["loss_sum"] / tf.cast(examples, tf.float32),
            accuracy=tf.cast(metrics["correct"], tf.float32) / tf.cast(examples, tf.float32),
            num_examples=metrics["num_examples"], clients_accepted=metrics["clients_accepted"],
            clients_rejected=metrics["clients_rejected"])
        return new_state, round_metrics

    @tff.federated_computation(tff.FederatedType(server_state_type, tff.SERVER),
                               tff.FederatedType(learning_rate_type, tff.SERVER),
                               tff.FederatedType(data_type, tff.CLIENTS),
                               tff.FederatedType(client_state_type, tff.CLIENTS))
    def next_fn(server_state, learning_rate, client_data, client_states):
        global_weights = tff.federated_broadcast(tff.federated_map(server_to_client, server_state))
        client_lr = tff.federated_broadcast(learning_rate)
        sent, new_client_states, metrics, reports = tff.federated_map(
            client_update, (global_weights, client_lr, client_data, client_states))
        if aggregation is None:
            mean = tff.federated_map(weighted_mean, tff.federated_sum(sent))
        else:
            aggregated = aggregation.next(server_state.aggregator, sent.update, sent.weight)
            mean = aggregated.result
        new_server_state, round_metrics = tff.federated_map(
            server_update, (server_state, mean, tff.federated_sum(metrics)))
        if aggregation is not None:
            new_server_state = tff.federated_map(with_aggregator, (new_server_state, aggregated.state))
        return new_server_state, new_client_states, round_metrics, reports

    options = dict(client_weighting=client_weighting, statistics=statistics,
                   persist_optimizer_state=persist_optimizer_state, locked=locked)
    return StatefulClientsProcess(initialize_fn, next_fn, model_fn=model_fn, parts=parts, options=options,
                                  client_state_type=client_state_type, data_type=data_type,
                                  initial_client_state_fn=initial_client_state)


def build_fedkl_process(model_fn, client_optimizer, server_optimizer=None, *, client_weighting="num_examples",
                        statistics="average", persist_optimizer_state=True, return_client_updates=False,
                        model_aggregator=None, client_update_transform=None):
    """Builds FedKL: each client trains with its own key and lock; only shared updates are summed.

    Args:
      model_fn: no-argument callable returning a new locked Keras model (same initial weights each
        call, e.g. `tfkl.models.build(..., lock=True, seed=s)`); its key is replaced by the client's.
      client_optimizer: a `tfkl.optimizers.TorchSGD` (protocol initialize/next with momentum buffers).
      server_optimizer: a `tff.learning.optimizers.Optimizer` applied to the mean shared update
        (default SGD 1.0, i.e. plain FedAvg of the shared weights).
      client_weighting: 'num_examples' (example-weighted mean) or 'uniform' (the paper's plain mean).
      statistics: 'average' (the shared moving statistics are averaged, as the paper does) or
        'local' (each client keeps its own; they become part of its private state).
      persist_optimizer_state: keep each client's momentum buffers (all its trainable variables,
        lock included) across the rounds it takes part in, as the paper does.
      return_client_updates: also return each client's shared update at CLIENTS (for capture).
      model_aggregator: a `tff.aggregators` factory for the shared updates (state kept in the server
        state under 'aggregator'); an unweighted one (e.g. `DifferentiallyPrivateFactory.gaussian_fixed`)
        needs client_weighting='uniform'. Default: the example- (or uniformly) weighted mean by
        `tff.federated_sum`.
      client_update_transform: a TF function applied to each client's shared update (a structure of
        tensors) before it is sent, e.g. `prune_smallest(0.9)`.
    """
    return _build_process(model_fn, client_optimizer, server_optimizer, locked=True,
                          client_weighting=client_weighting, statistics=statistics,
                          persist_optimizer_state=persist_optimizer_state,
                          return_client_updates=return_client_updates, model_aggregator=model_aggregator,
                          client_update_transform=client_update_transform)


def build_fedavg_process(model_fn, client_optimizer, server_optimizer=None, *, client_weighting="num_examples",
                         statistics="average", persist_optimizer_state=True, return_client_updates=False,
                         model_aggregator=None, client_update_transform=None):
    """Builds the FedAvg baseline on the same model without the lock and the same training details.

    Arguments as `build_fedkl_process`; `model_fn` returns the plain (unlocked) model.
    """
    return _build_process(model_fn, client_optimizer, server_optimizer, locked=False,
                          client_weighting=client_weighting, statistics=statistics,
                          persist_optimizer_state=persist_optimizer_state,
                          return_client_updates=return_client_updates, model_aggregator=model_aggregator,
                          client_update_transform=client_update_transform)
