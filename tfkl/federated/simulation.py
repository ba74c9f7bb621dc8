"""The simulation driver: client sampling, per-client private state, dropouts and captures.

`run_round` executes one round of a `StatefulClientsProcess` for the sampled clients and keeps the
returned private states per client id; clients that fail before reporting are dropped from the
round (the rest go on), and clients whose update is not finite are rejected by the round itself.
"""

import logging

import numpy as np

from tfkl import capture as capture_lib
from tfkl import private

logger = logging.getLogger(__name__)


class ClientFailure(RuntimeError):
    """A client that dropped out of a round before reporting."""


def sample_clients(num_clients, clients_per_round, seed, round_num):
    """The client ids of a round: a uniform sample without replacement, deterministic per seed."""
    rng = np.random.default_rng([int(seed), int(round_num), 0x5A3F])
    return [str(i) for i in sorted(rng.choice(int(num_clients), int(clients_per_round), replace=False))]


def data_seed(seed, round_num, client_id):
    """The shuffle seed of one client's data in one round."""
    return int(np.random.default_rng([int(seed), int(round_num), int(client_id), 0xD47A]).integers(2**31 - 1))


class SharedLayout:
    """Maps the process's (trainable, non_trainable) shared lists to `tfkl.shared_variables` order."""

    def __init__(self, model, parts):
        trainable_pos = {id(model.trainable_variables[i]): ("t", k) for k, i in enumerate(parts.trainable)}
        non_trainable_pos = {id(model.non_trainable_variables[i]): ("n", k)
                             for k, i in enumerate(parts.non_trainable)}
        positions = {**trainable_pos, **non_trainable_pos}
        shared = private.shared_variables(model) if parts.locked else list(model.variables)
        self.order = [positions[id(v)] for v in shared]
        self.names = [v.name for v in shared]
        self.trainable = [kind == "t" for kind, _ in self.order]

    def flatten(self, trainable, non_trainable):
        lists = {"t": list(trainable), "n": list(non_trainable)}
        return [np.asarray(lists[kind][k]) for kind, k in self.order]


def run_round(process, server_state, client_states, client_ids, client_data_fn, learning_rate):
    """Runs one round on `client_ids`; returns (server_state, metrics, reports by client id).

    `client_states` (client id -> private state) is updated in place for the clients that took part.
    `client_data_fn(client_id)` returns the client's tf.data.Dataset or raises (a dropout).
    """
    taking_part, datasets = [], []
    for client_id in client_ids:
        try:
            datasets.append(client_data_fn(client_id))
            taking_part.append(client_id)
        except ClientFailure as e:
            logger.warning("client %s dropped out of the round: %s", client_id, e)
    if not taking_part:
        raise ClientFailure("every sampled client dropped out")
    states = [client_states[c] for c in taking_part]
    server_state, new_states, metrics, reports = process.next(server_state, np.float32(learning_rate), datasets,
                                                              states)
    by_client = {}
    for client_id, state, report in zip(taking_part, new_states, reports):
        client_states[client_id] = state
        by_client[client_id] = report
        if not report["accepted"]:
            logger.warning("client %s sent a non-finite update: rejected", client_id)
    dropped = [c for c in client_ids if c not in by_client]
    metrics = dict(metrics, clients_dropped=len(dropped))
    return server_state, metrics, by_client


def save_captures(root_dir, round_num, layout, global_trainable, global_non_trainable, reports, meta_fn):
    """Writes what a curious server received from each accepted client this round (tfkl.capture).

    `meta_fn(client_id)` gives the run's fields and the client's `num_examples` (its data set size).
    """
    global_weights = layout.flatten(global_trainable, global_non_trainable)
    paths = []
    for client_id, report in reports.items():
        if not report["accepted"]:
            continue
        update = report["update"]
        non_trainable = update["non_trainable"] or [np.zeros_like(w) for w in global_non_trainable]
        meta = dict(meta_fn(client_id), round=int(round_num), client_id=str(client_id),
                    num_steps=int(report["num_steps"]), examples_processed=int(report["num_examples"]),
                    variable_names=layout.names, trainable=layout.trainable)
        path = capture_lib.capture_path(root_dir, round_num, client_id)
        capture_lib.save_capture(path, meta, global_weights, layout.flatten(update["trainable"], non_trainable))
        paths.append(path)
    return paths
