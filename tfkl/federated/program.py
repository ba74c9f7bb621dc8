"""The federated training program: the loop over rounds, and `train`, which wires it to a run directory.

`train` checks the run directory (tfkl.federated.run_dir), builds the process, restores the last
complete round and opens the state and metrics managers; the loop, `train_rounds`, receives them as
arguments, as the program logic of TFF's examples (`train_federated_model`) does.
"""

import asyncio
import dataclasses
import logging
import time

import numpy as np
import tensorflow as tf

from tfkl import data as data_lib
from tfkl.federated import run_dir, simulation
from tfkl.federated.client_data import client_dataset, client_partition
from tfkl.federated.config import Config, ProgramError, build_process

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunOptions:
    """Per-invocation options that do not define the run (may differ when resuming)."""
    rounds: int = 10
    capture_rounds: tuple = ()   # round numbers to capture; ("all",) for every round
    keep_rounds: int = 5         # complete rounds kept on disk (the latest always)
    inject_nan: tuple = ()       # ((round, client_id), ...): the client's data become NaN
    inject_failure: tuple = ()   # ((round, client_id), ...): the client's computation fails mid-epoch
    progress: bool = True
    cache_client_data: bool = True  # each client's examples as a tf.data snapshot under root_dir/client_data


def ground_truth_batches(meta, dataset=None):
    """The batches a captured client trained on in its round, from the capture's `ground_truth`.

    For scoring an attack only (the attacker never reads `ground_truth`). Returns a list of
    (images, labels) numpy batches in training order, all local epochs included.
    """
    truth = meta["ground_truth"]
    config = Config(dataset=truth["dataset"], data_dir=truth["data_dir"], input_shape=tuple(meta["input_shape"]),
                    num_classes=int(meta["num_classes"]), num_clients=int(truth["num_clients"]),
                    split=truth["split"], alpha=float(truth["alpha"]), seed=int(truth["split_seed"]),
                    batch_size=int(meta["batch_size"]), local_epochs=int(meta["local_epochs"]))
    dataset = dataset or data_lib.load(config.dataset, config.data_dir)
    indices = client_partition(config, dataset)[int(truth["client_index"])]
    return list(client_dataset(config, dataset, indices, int(truth["shuffle_seed"])).as_numpy_iterator())


def _captures_round(options, round_num):
    return "all" in options.capture_rounds or round_num in options.capture_rounds


def capture_meta_fn(config, dataset_name, learning_rate, data_seeds, partition):
    """The capture meta for one client: attacker-usable fields, and a separate ground-truth section."""
    def meta(client_id):
        return dict(
            num_examples=int(len(partition[int(client_id)])),
            algorithm=config.algorithm, model=config.model, input_shape=list(config.input_shape),
            num_classes=config.num_classes, lock=config.locked, key_dim=config.key_dim, where=config.lock_where,
            lock_init=config.lock_init, activation="relu",
            normalization=config.normalization, init=config.init, batch_size=config.batch_size,
            local_epochs=config.local_epochs, learning_rate=float(learning_rate), momentum=config.momentum,
            nesterov=config.nesterov, weight_decay=config.weight_decay,
            loss="sparse_categorical_crossentropy_from_logits_mean",
            optimizer_state="persistent" if config.persist_optimizer_state else "fresh",
            statistics=config.statistics, client_weighting=config.client_weighting,
            ground_truth=dict(
                note="for scoring an attack only; not attacker knowledge", dataset=dataset_name,
                data_dir=config.data_dir, split=config.split, alpha=config.alpha, split_seed=config.seed,
                num_clients=config.num_clients, client_index=int(client_id),
                shuffle_seed=data_seeds[client_id], input_pipeline="tfkl.federated.program.client_dataset"))
    return meta


def train(root_dir, config, options, dataset=None):
    """Runs (or resumes) training in `root_dir` to `options.rounds`; returns the final round's metrics."""
    dataset = dataset or data_lib.load(config.dataset, config.data_dir)
    try:
        partition = client_partition(config, dataset)
    except ValueError as e:
        raise ProgramError(f"cannot split the data among the clients: {e}") from None
    run_dir.check_config(root_dir, config)
    process = build_process(config, return_client_updates=bool(options.capture_rounds))
    state_manager = run_dir.RunStateManager(root_dir, options.keep_rounds)
    restored = state_manager.load(config, process)  # before a release manager writes into root_dir
    return train_rounds(root_dir, process, config, options, dataset, partition, restored,
                        state_manager=state_manager, metrics_manager=run_dir.metrics_manager(root_dir))


def train_rounds(root_dir, process, config, options, dataset, partition, restored, *, state_manager,
                 metrics_manager):
    """Trains from `restored` ((server_state, client_states, round); None: a new run) to `options.rounds`.

    Each round is saved through `state_manager` (a run_dir.RunStateManager) and its metrics released
    through `metrics_manager` (a tff.program.ReleaseManager); captures and client data snapshots go
    under `root_dir`. Returns the final round's metrics.
    """
    if restored is None:
        server_state = process.initialize()
        client_lock = config.client_lock_fn()
        client_states = {str(c): process.initial_client_state(state_manager.initial_key(config, c), client_lock(c))
                         for c in range(config.num_clients)}
        start = 0
        state_manager.save(0, server_state, client_states, changed=set(client_states))
    else:
        server_state, client_states, start = restored
        logger.info("resuming %s after round %d", root_dir, start)
        if options.progress:
            print(f"resuming {root_dir} after round {start} (the last complete one)")
    capture = bool(options.capture_rounds)
    layout = simulation.SharedLayout(config.model_fn()(), process.parts)
    cache_dir = run_dir.client_data_dir(root_dir) if options.cache_client_data else None
    nan_at, fail_at = set(options.inject_nan), set(options.inject_failure)
    progress = tf.keras.utils.Progbar(options.rounds, stateful_metrics=["loss", "accuracy", "rejected",
                                                                       "dropped", "s/round"],
                                      verbose=1 if options.progress else 0)
    progress.update(min(start, options.rounds))
    metrics = None
    for round_num in range(start + 1, options.rounds + 1):
        started = time.time()
        sampled = simulation.sample_clients(config.num_clients, config.clients_per_round, config.seed, round_num)
        seeds = {c: simulation.data_seed(config.seed, round_num, c) for c in sampled}

        def client_data(client_id, round_num=round_num, seeds=seeds):
            return client_dataset(config, dataset, partition[int(client_id)], seeds[client_id], cache_dir,
                                  client_id, poison=(round_num, client_id) in nan_at,
                                  fail=(round_num, client_id) in fail_at)

        learning_rate = config.round_learning_rate(round_num)
        global_t, global_n = process.global_weights(server_state)
        try:
            server_state, new_client_states, metrics, reports = simulation.run_round(
                process, server_state, client_states, sampled, client_data, learning_rate)
        except simulation.RoundFailed as e:
            raise ProgramError(f"round {round_num}: {e}; fix the cause and run the same command again") from None
        client_states = {**client_states, **new_client_states}
        if capture and _captures_round(options, round_num):
            simulation.save_captures(root_dir, round_num, layout, global_t, global_n, reports,
                                     capture_meta_fn(config, dataset.name, learning_rate, seeds, partition))
        metrics = {k: (float(v) if isinstance(v, (float, np.floating)) else int(v)) for k, v in metrics.items()}
        metrics.update(learning_rate=float(learning_rate), seconds=time.time() - started)
        # Released before the state is saved: a resumed round releases again, replacing its rows.
        asyncio.run(metrics_manager.release(metrics, round_num))
        state_manager.save(round_num, server_state, client_states, changed=set(new_client_states))
        progress.update(round_num, [("loss", metrics["loss"]), ("accuracy", metrics["accuracy"]),
                                    ("rejected", metrics["clients_rejected"]),
                                    ("dropped", metrics["clients_dropped"]), ("s/round", metrics["seconds"])])
    return metrics
