"""The simulation driver: client sampling, per-client private state and dropouts.

`run_round` executes one round of a `StatefulClientsProcess` for the sampled clients and returns
their new private states by client id; clients whose computation fails mid-round are dropped from
the round (the rest go on), and clients whose update is not finite are rejected by the round itself.
"""

import logging

import grpc
import numpy as np

logger = logging.getLogger(__name__)


class RoundFailed(RuntimeError):
    """A round in which no sampled client could report."""


def sample_clients(num_clients, clients_per_round, seed, round_num):
    """The client ids of a round: a uniform sample without replacement, deterministic per seed."""
    rng = np.random.default_rng([int(seed), int(round_num), 0x5A3F])
    return [str(i) for i in sorted(rng.choice(int(num_clients), int(clients_per_round), replace=False))]


def data_seed(seed, round_num, client_id):
    """The shuffle seed of one client's data in one round."""
    return int(np.random.default_rng([int(seed), int(round_num), int(client_id), 0xD47A]).integers(2**31 - 1))


def run_round(process, server_state, client_states, client_ids, client_data_fn, learning_rate):
    """Runs one round on `client_ids`; returns (server_state, new client states, metrics, reports).

    `client_states` maps client id -> private state; the new states and the reports are by client
    id, for the clients that took part. `client_data_fn(client_id)` returns the client's
    tf.data.Dataset. A client whose computation fails inside the round (TFF reports it as a failed
    RPC) is found by running the clients one by one, logged and dropped; the round is then run again
    with the others.
    """
    learning_rate = np.float32(learning_rate)
    datasets = {c: client_data_fn(c) for c in client_ids}

    def next_round(ids):
        return process.next(server_state, learning_rate, [datasets[c] for c in ids], [client_states[c] for c in ids])

    taking_part = list(client_ids)
    try:
        outputs = next_round(taking_part)
    except grpc.RpcError as error:
        logger.warning("a client failed inside the round (%s); finding it", _first_line(error))
        taking_part = [c for c in client_ids if _completes(next_round, c)]
        if not taking_part:
            raise RoundFailed(f"every sampled client failed: {_first_line(error)}") from None
        outputs = next_round(taking_part)
    server_state, new_states, metrics, reports = outputs
    for client_id, report in zip(taking_part, reports):
        if not report["accepted"]:
            logger.warning("client %s sent a non-finite update: rejected", client_id)
    metrics = dict(metrics, clients_dropped=len(client_ids) - len(taking_part))
    return server_state, dict(zip(taking_part, new_states)), metrics, dict(zip(taking_part, reports))


def _first_line(error):
    details = error.details() if hasattr(error, "details") else str(error)
    return (details or str(error)).strip().splitlines()[0][:200]


def _completes(next_round, client_id):
    try:
        next_round([client_id])
        return True
    except grpc.RpcError as error:
        logger.warning("client %s failed mid-round and is dropped: %s", client_id, _first_line(error))
        return False
