"""FedKL and FedAvg as TFF computations with private, persistent client state (stateful clients).

TFF's learning algorithms keep no per-client state, so the round follows TFF's stateful-clients
example: the client work and the server update are plain TF functions (`client_work`), placed here
by named TFF parts (initializer, distributor, client work, aggregator, finalizer) that `compose_round`
puts together, as TFF's `compose_learning_process` does. Only the shared update crosses to SERVER,
through a TFF aggregation factory (default: the weighted `tff.aggregators.MeanFactory`) whose state
lives in the server state.
"""

import collections
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tfkl.federated import client_work
from tfkl.names import CLIENT_WEIGHTINGS, KEY_DISTRIBUTIONS, STATISTICS
from tfkl.optimizers import TorchSGD


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


class StatefulClientsProcess(tff.templates.IterativeProcess):
    """An iterative process whose clients keep private state between the rounds they take part in.

    Its computations:
    *   `initialize`: `( -> S@SERVER)`, `S` an OrderedDict of the shared weights (`trainable`,
        `non_trainable`), the server optimizer's state (`optimizer`), `round_num` and the
        aggregator's state (`aggregator`).
    *   `next`: `(<S@SERVER, learning_rate@SERVER, {B*}@CLIENTS, C@CLIENTS> ->
        <S@SERVER, C@CLIENTS, M@SERVER, R@CLIENTS>)`, with `{B*}` the client datasets of
        (images, labels) batches, `C` a client's private state (`client_work`'s key, lock, optimizer,
        statistics), `M` the round's metrics (loss, accuracy, num_examples, clients_accepted,
        clients_rejected) and `R` each client's report (num_examples, num_steps, accepted and, with
        `return_client_updates`, its shared update).

    Attributes beyond IterativeProcess: `initial_client_state(key, lock=None)` (numpy structure for one
    client; `lock`: its own initial lock weights instead of the model_fn's),
    `client_state_type`, `server_state_type`, `data_type`, `model_fn`, `parts`, `options`, and
    `global_weights(server_state)` (the shared weights as numpy lists).
    """

    def __init__(
        self, initialize_fn, next_fn, *, model_fn, parts, options, client_state_type, data_type, initial_client_state_fn
    ):
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
        return (
            [np.asarray(w) for w in server_state["trainable"]],
            [np.asarray(w) for w in server_state["non_trainable"]],
        )


def _types(variables):
    return [tff.TensorType(v.dtype.as_numpy_dtype, v.shape) for v in variables]


def _client_weighting(value):
    """A `tff.learning.ClientWeighting` from the enum or its lower-case name."""
    if isinstance(value, tff.learning.ClientWeighting):
        return value
    if value not in CLIENT_WEIGHTINGS:
        raise ValueError(f"client_weighting must be one of {CLIENT_WEIGHTINGS}, got {value!r}")
    return tff.learning.ClientWeighting[value.upper()]


def _weighted_aggregator(model_aggregator, client_weighting):
    if model_aggregator is None:
        return tff.aggregators.MeanFactory(no_nan_division=True)  # a round whose clients are all rejected: 0
    if isinstance(model_aggregator, tff.aggregators.UnweightedAggregationFactory):
        if client_weighting is not tff.learning.ClientWeighting.UNIFORM:
            raise ValueError("an unweighted model_aggregator (e.g. DP) needs client_weighting='uniform'")
        return tff.aggregators.as_weighted_aggregator(model_aggregator)
    if not isinstance(model_aggregator, tff.aggregators.WeightedAggregationFactory):
        raise TypeError(f"model_aggregator must be a TFF aggregation factory, got {type(model_aggregator).__name__}")
    return model_aggregator


def _checked_model(model_fn, locked, statistics, random_key_penalty, key_distribution):
    """(a model_fn model, its `client_work.ModelParts`) once the options are valid for it."""
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}")
    if key_distribution not in KEY_DISTRIBUTIONS:
        raise ValueError(f"key_distribution must be one of {KEY_DISTRIBUTIONS}, got {key_distribution!r}")
    if random_key_penalty < 0 or (random_key_penalty > 0 and not locked):
        raise ValueError(f"random_key_penalty must be >= 0, and 0 without a lock; got {random_key_penalty}")
    model = model_fn()
    parts = client_work.ModelParts(model)
    if locked != parts.locked:
        raise ValueError(
            "FedKL needs a model with a KeyLock layer" if locked else "FedAvg takes a model without a KeyLock layer"
        )
    return model, parts


class RoundTypes(NamedTuple):
    """The TFF types of a round's values (unplaced)."""

    data: tff.Type  # a client's dataset of (images, labels) batches
    shared: tff.Type  # the shared weights the server broadcasts
    update: tff.Type  # a client's shared update
    client_state: tff.Type  # a client's private state (see `client_work`)
    learning_rate: tff.Type


def round_types(model, *, keep_statistics, persist_optimizer_state):
    """The `RoundTypes` of a process on `model` (a model_fn's model)."""
    shared_t, shared_n, key_vars, lock_vars = client_work.ModelParts(model).split(model)
    client_state = collections.OrderedDict(
        key=_types(key_vars[:1]),
        lock=_types(lock_vars),
        optimizer=_types(model.trainable_variables) if persist_optimizer_state else [],
        statistics=_types(shared_n) if keep_statistics else [],
    )
    return RoundTypes(
        data=tff.SequenceType(
            (tff.TensorType(np.float32, (None,) + tuple(model.input_shape[1:])), tff.TensorType(np.int64, [None]))
        ),
        shared=tff.to_type(collections.OrderedDict(trainable=_types(shared_t), non_trainable=_types(shared_n))),
        update=tff.to_type(
            collections.OrderedDict(
                trainable=_types(shared_t), non_trainable=[] if keep_statistics else _types(shared_n)
            )
        ),
        client_state=tff.to_type(client_state),
        learning_rate=tff.TensorType(np.float32),
    )


def build_initializer(model_fn, server_optimizer, aggregator):
    """The server's side of the start: (`initialize`, `with_aggregator`).

    `initialize`: `( -> S@SERVER)`, model_fn's shared weights, the server optimizer's state, round 0
    and the aggregator's state; `with_aggregator`: the TF computation that adds an aggregator state
    to a server state (`client_work.initial_server_state`'s keys).
    """

    @tff.tensorflow.computation
    def server_init():
        return client_work.initial_server_state(model_fn(), server_optimizer)

    @tff.tensorflow.computation(server_init.type_signature.result, aggregator.state_type.member)
    def with_aggregator(state, aggregator_state):
        return collections.OrderedDict(**state, aggregator=aggregator_state)

    @tff.federated_computation
    def initialize():
        return tff.federated_map(
            with_aggregator, (tff.federated_eval(server_init, tff.SERVER), aggregator.initialize())
        )

    return initialize, with_aggregator


def build_distributor(server_state_type):
    """`(S@SERVER -> W@CLIENTS)`: the shared weights of the server state, broadcast."""

    @tff.tensorflow.computation(server_state_type)
    def server_to_client(server_state):
        return collections.OrderedDict(trainable=server_state["trainable"], non_trainable=server_state["non_trainable"])

    @tff.federated_computation(tff.FederatedType(server_state_type, tff.SERVER))
    def distribute(server_state):
        return tff.federated_broadcast(tff.federated_map(server_to_client, server_state))

    return distribute


def build_client_work(model_fn, client_optimizer, types, *, return_client_updates, **options):
    """The client's TF computation `(<W, learning_rate, {B*}, C> -> client_work.ClientOutput)`.

    `options`: `client_work.client_update`'s keyword arguments. With `return_client_updates`, the
    report carries the shared update; else an empty one.
    """

    @tff.tensorflow.computation(types.shared, types.learning_rate, types.data, types.client_state)
    def client_update(global_weights, learning_rate, dataset, state):
        output = client_work.client_update(
            model_fn(), client_optimizer, global_weights, learning_rate, dataset, state, **options
        )
        sent = output.update if return_client_updates else collections.OrderedDict(trainable=[], non_trainable=[])
        return output._replace(report=collections.OrderedDict(**output.report, update=sent))

    return client_update


def build_finalizer(server_optimizer, server_state_type, update_type, with_aggregator):
    """`(<S@SERVER, U@SERVER, A@SERVER> -> S@SERVER)`: the server optimizer applies the mean shared update
    U (`client_work.server_update`); A, the aggregator's new state, goes into the new server state."""

    @tff.tensorflow.computation(server_state_type, update_type)
    def server_update(server_state, mean_update):
        return client_work.server_update(server_optimizer, server_state, mean_update)

    @tff.federated_computation(
        tff.FederatedType(server_state_type, tff.SERVER),
        tff.FederatedType(update_type, tff.SERVER),
        tff.FederatedType(with_aggregator.type_signature.parameter[1], tff.SERVER),
    )
    def finalize(server_state, mean_update, aggregator_state):
        return tff.federated_map(
            with_aggregator, (tff.federated_map(server_update, (server_state, mean_update)), aggregator_state)
        )

    return finalize


def compose_round(distributor, client_update, aggregator, finalizer):
    """The process's `next` from its parts, as TFF's `compose_learning_process`: distribute, train on
    the clients, aggregate, finalize; the round's metrics from the clients' sums
    (`client_work.round_metrics`). The argument types are those of the parts."""
    server_state_type = distributor.type_signature.parameter
    _, learning_rate_type, data_type, client_state_type = client_update.type_signature.parameter

    @tff.tensorflow.computation(client_update.type_signature.result.metrics)
    def round_metrics(metric_sums):
        return client_work.round_metrics(metric_sums)

    @tff.federated_computation(
        server_state_type,
        tff.FederatedType(learning_rate_type, tff.SERVER),
        tff.FederatedType(data_type, tff.CLIENTS),
        tff.FederatedType(client_state_type, tff.CLIENTS),
    )
    def next_fn(server_state, learning_rate, client_data, client_states):
        global_weights = distributor(server_state)
        outputs = tff.federated_map(
            client_update, (global_weights, tff.federated_broadcast(learning_rate), client_data, client_states)
        )
        aggregated = aggregator.next(server_state.aggregator, outputs.update, outputs.weight)
        new_server_state = finalizer(server_state, aggregated.result, aggregated.state)
        metrics = tff.federated_map(round_metrics, tff.federated_sum(outputs.metrics))
        return new_server_state, outputs.client_state, metrics, outputs.report

    return next_fn


def build_stateful_clients_process(
    model_fn: Callable[[], tf.keras.Model],
    client_optimizer: TorchSGD,
    server_optimizer: tff.learning.optimizers.Optimizer | None = None,
    *,
    locked: bool,
    client_weighting: str | tff.learning.ClientWeighting = "num_examples",
    statistics: str = "average",
    persist_optimizer_state: bool = True,
    return_client_updates: bool = False,
    model_aggregator: tff.aggregators.AggregationFactory | None = None,
    client_update_transform: Callable | None = None,
    random_key_penalty: float = 0.0,
    key_distribution: str = "uniform",
) -> StatefulClientsProcess:
    """Builds FedKL (`locked`) or FedAvg with stateful clients: only shared updates reach the server.

    Composed as TFF's FedAvg (`compose_round`) of `build_initializer`, `build_distributor` (broadcasts
    the shared weights), `build_client_work` (each client trains with its own key and lock), the
    aggregator of the shared updates and `build_finalizer` (the server optimizer applies their mean).
    Returns a `StatefulClientsProcess` (its docstring gives the computations' types).

    Args:
      model_fn: returns a new Keras model, with the same initial weights on each call (e.g.
        `tfkl.models.build(..., lock=locked, seed=s)`); FedKL: its key is replaced by each client's.
      client_optimizer: a `tfkl.optimizers.TorchSGD` (protocol initialize/next with momentum buffers).
      server_optimizer: a `tff.learning.optimizers.Optimizer` of the mean shared update (default SGD 1.0).
      locked: FedKL (the model has KeyLock layers) or FedAvg (it has none).
      client_weighting: 'num_examples', 'uniform' (the paper's plain mean) or a `tff.learning.ClientWeighting`.
      statistics: 'average' (moving statistics averaged, as the paper does) or 'local' (kept by each client).
      persist_optimizer_state: keep each client's momentum buffers (lock included) between its rounds.
      return_client_updates: also return each client's shared update at CLIENTS (for capture).
      model_aggregator: a `tff.aggregators` factory of the shared updates (default `MeanFactory`, 0 when
        every client is rejected); an unweighted one (e.g. DP) needs client_weighting='uniform'.
      client_update_transform: a TF function of each shared update before it is sent (`prune_smallest`).
      random_key_penalty, key_distribution: FedKL: the weight of the term that pushes each step's
        predictions under a fresh key of `key_distribution` towards uniform (0: none; see
        `client_work.client_update`).
    """
    weighting = _client_weighting(client_weighting)
    probe, parts = _checked_model(model_fn, locked, statistics, random_key_penalty, key_distribution)
    if server_optimizer is None:
        server_optimizer = tff.learning.optimizers.build_sgdm(learning_rate=1.0)
    keep_statistics = statistics == "local"
    types = round_types(probe, keep_statistics=keep_statistics, persist_optimizer_state=persist_optimizer_state)
    aggregator = _weighted_aggregator(model_aggregator, weighting).create(types.update, tff.TensorType(np.float32))
    penalty = dict(random_key_penalty=float(random_key_penalty), key_distribution=key_distribution)

    initialize, with_aggregator = build_initializer(model_fn, server_optimizer, aggregator)
    server_state_type = initialize.type_signature.result.member
    client_update = build_client_work(
        model_fn,
        client_optimizer,
        types,
        return_client_updates=return_client_updates,
        weight_by_examples=weighting is tff.learning.ClientWeighting.NUM_EXAMPLES,
        update_transform=client_update_transform,
        **penalty,
    )
    finalizer = build_finalizer(server_optimizer, server_state_type, types.update, with_aggregator)
    next_fn = compose_round(build_distributor(server_state_type), client_update, aggregator, finalizer)
    options = dict(
        client_weighting=weighting.name.lower(),
        statistics=statistics,
        persist_optimizer_state=persist_optimizer_state,
        locked=locked,
        **penalty,
    )
    return StatefulClientsProcess(
        initialize,
        next_fn,
        model_fn=model_fn,
        parts=parts,
        options=options,
        client_state_type=types.client_state,
        data_type=types.data,
        initial_client_state_fn=client_work.initial_client_state_fn(
            probe, persist_optimizer_state=persist_optimizer_state, keep_statistics=keep_statistics
        ),
    )


def build_fedkl_process(
    model_fn: Callable[[], tf.keras.Model],
    client_optimizer: TorchSGD,
    server_optimizer: tff.learning.optimizers.Optimizer | None = None,
    **options,
) -> StatefulClientsProcess:
    """Builds FedKL: each client trains with its own key and lock; only shared updates are aggregated.

    `model_fn` returns a new locked Keras model; the other arguments as `build_stateful_clients_process`.
    """
    return build_stateful_clients_process(model_fn, client_optimizer, server_optimizer, locked=True, **options)


def build_fedavg_process(
    model_fn: Callable[[], tf.keras.Model],
    client_optimizer: TorchSGD,
    server_optimizer: tff.learning.optimizers.Optimizer | None = None,
    **options,
) -> StatefulClientsProcess:
    """Builds the FedAvg baseline on the same model without the lock and the same training details.

    `model_fn` returns the plain (unlocked) model; the other arguments as `build_stateful_clients_process`.
    """
    return build_stateful_clients_process(model_fn, client_optimizer, server_optimizer, locked=False, **options)
