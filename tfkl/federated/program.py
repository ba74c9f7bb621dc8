"""The federated training program: the loop over rounds, and `train`, which wires it to a run directory.

`train` checks the run directory (tfkl.federated.run_dir), builds the process, restores the last
complete round and opens the state and metrics managers; the loop, `train_rounds`, receives them as
arguments, as the program logic of TFF's examples (`train_federated_model`) does.
"""

import asyncio
import dataclasses
import errno
import logging
import os
import time

import numpy as np
import tensorflow as tf

from tfkl import capture as capture_lib
from tfkl import data as data_lib
from tfkl.federated import run_dir, simulation
from tfkl.federated.client_data import client_dataset, client_partition, round_examples
from tfkl.federated.config import ProgramError, build_process

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunOptions:
    """Per-invocation options that do not define the run (may differ when resuming)."""

    rounds: int = 10
    capture_rounds: tuple = ()  # round numbers to capture; ("all",) for every round
    keep_rounds: int = 5  # complete rounds kept on disk (the latest always)
    inject_nan: tuple = ()  # ((round, client_id), ...): the client's data become NaN
    inject_failure: tuple = ()  # ((round, client_id), ...): the client's computation fails mid-epoch
    progress: bool = True
    cache_client_data: bool = True  # each client's examples in a file under root_dir/client_data


def train(root_dir, config, options, dataset=None, partition=None, metrics_manager=None):
    """Runs (or resumes) training in `root_dir` to `options.rounds`; returns the final round's metrics
    (None when the run has already reached `options.rounds`: nothing to do).

    `partition[i]`: client i's example indices in `dataset` (default: the config's split of it).
    `metrics_manager`: where each round's metrics go (default: run_dir.metrics_manager(root_dir)).
    """
    dataset = dataset or data_lib.load(config.dataset, config.data_dir)
    if partition is None:
        try:
            partition = client_partition(config, dataset)
        except ValueError as e:
            raise ProgramError(f"cannot split the data among the clients: {e}") from None
    largest = max(len(examples) for examples in partition)
    if options.progress and (config.examples_per_client or 0) > largest:
        print(
            f"warning: examples_per_client={config.examples_per_client} exceeds every client's examples (at most "
            f"{largest}): each client trains on all of its examples"
        )
    run_dir.check_root_dir(root_dir)
    try:
        with run_dir.ownership(root_dir):
            return _train_owned(root_dir, config, options, dataset, partition, metrics_manager)
    except Exception as e:
        failure = _write_failure(e)
        if failure is None:
            raise
        cause, advice = failure
        raise ProgramError(
            f"cannot save the run in {root_dir}: {cause}; {advice}, and run the same command again: it resumes from "
            "its last complete round"
        ) from None


_FULL = "free space, or move the run to a bigger disk"
_READ_ONLY = "make the run's files and directories writable again (chattr -i, chmod u+w, a read-write mount)"
_WRITE_FAILURES = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: _FULL,
    errno.EPERM: _READ_ONLY,
    errno.EACCES: _READ_ONLY,
    errno.EROFS: _READ_ONLY,
}


def _write_failure(error):
    """(the OS's message, what to do) when `error`, or an error it was raised from, is a write the disk refused
    (full, a quota, read-only: an OSError, or TensorFlow's error of an op that writes a file); else None."""
    while error is not None and not isinstance(error, ProgramError):  # a ProgramError has its own line
        if isinstance(error, OSError) and error.errno in _WRITE_FAILURES:
            return os.strerror(error.errno), _WRITE_FAILURES[error.errno]
        if isinstance(error, tf.errors.OpError):
            for number, advice in _WRITE_FAILURES.items():
                if os.strerror(number) in error.message:
                    return os.strerror(number), advice
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None


def _train_owned(root_dir, config, options, dataset, partition, metrics_manager):
    """`train` once this process owns `root_dir` (run_dir.ownership)."""
    run_dir.check_config(root_dir, config)
    run_dir.check_writable(root_dir)
    process = build_process(config, return_client_updates=bool(options.capture_rounds))
    state_manager = run_dir.RunStateManager(root_dir, options.keep_rounds)
    rerun, unsealed = state_manager.check_states(), state_manager.unsealed_rounds()
    complete = state_manager.complete_rounds()
    checked = bool(complete) and state_manager.check_manifest(complete[-1])  # before TensorFlow reads its files
    restored = state_manager.load(config, process, client_ids=())  # before a release manager writes into root_dir
    if restored is not None:
        start = restored[2]
        if start >= options.rounds:
            if options.progress:
                print(f"nothing to do: {root_dir} has trained {start} rounds already (--rounds={options.rounds})")
            return None
        next_clients = simulation.sample_clients(config.num_clients, config.clients_per_round, config.seed, start + 1)
        state_manager.check_clients(config, process, start, next_clients)
        if options.progress:
            print(f"resuming {root_dir} after round {start}{_resume_reason(root_dir, rerun, unsealed)}")
            if not checked:
                print(
                    f"note: {root_dir} has no manifest of round {start} (saved before runs had them): its files are "
                    "not checked this time; every round from now on gets one"
                )
    state_manager.drop_unsealed()
    if metrics_manager is None:
        last = 0 if restored is None else restored[2]
        for warning in (state_manager.restore_metrics(last), run_dir.repair_metrics(root_dir, last)):
            if warning and options.progress:
                print(warning)
    return train_rounds(
        root_dir,
        process,
        config,
        options,
        dataset,
        partition,
        restored,
        state_manager=state_manager,
        metrics_manager=metrics_manager or run_dir.metrics_manager(root_dir),
    )


def _resume_reason(root_dir, rerun, unsealed):
    """Why a resumed run starts where it does: the rounds after it lack their server state or manifest."""
    if not rerun:
        return " (the last complete one)"
    lacking = [
        f"{root_dir}/{directory} lacks {', '.join(name.format(r) for r in rounds)}"
        for directory, name, rounds in (
            ("server", "program_state_{}", [r for r in rerun if r not in unsealed]),
            ("manifests", "manifest_{:05d}.json", [r for r in rerun if r in unsealed]),
        )
        if rounds
    ]
    return (
        f": {' and '.join(lacking)} (an interrupted save, or deleted), so round"
        f"{'s' if len(rerun) > 1 else ''} {', '.join(map(str, rerun))} train{'' if len(rerun) > 1 else 's'} again"
    )


def train_rounds(root_dir, process, config, options, dataset, partition, restored, *, state_manager, metrics_manager):
    """Trains from `restored` ((server_state, client_states, round); None: a new run) to `options.rounds`.

    Each round is saved through `state_manager` (a run_dir.RunStateManager) and its metrics released
    through `metrics_manager` (a tff.program.ReleaseManager); captures and client data files go
    under `root_dir`. Client states stay on disk: a round reads its sampled clients' states only,
    each client's created on its first sampling, and writes back the ones that changed (the client
    states in `restored` are not used). Returns the final round's metrics.
    """
    if restored is None:
        server_state = process.initialize()
        start = 0
        state_manager.save(0, server_state, {}, changed=set())
    else:
        server_state, _, start = restored
        logger.info("resuming %s after round %d", root_dir, start)
    create_client = state_manager.initial_state_fn(config, process)
    layout = capture_lib.SharedLayout(config.model_fn()(), process.parts)
    client_data_fn = _client_data_fn(root_dir, config, options, dataset)
    progress = _progress_bar(options, start)
    metrics = None
    try:
        for round_num in range(start + 1, options.rounds + 1):
            started = time.time()
            sampled = simulation.sample_clients(config.num_clients, config.clients_per_round, config.seed, round_num)
            client_states, _ = state_manager.client_states(config, process, round_num - 1, sampled, create_client)
            seeds = {c: simulation.data_seed(config.seed, round_num, c) for c in sampled}
            examples = {c: round_examples(config, partition[int(c)], c, round_num) for c in sampled}
            learning_rate = config.round_learning_rate(round_num)
            global_t, global_n = process.global_weights(server_state)
            try:
                server_state, new_client_states, metrics, reports = simulation.run_round(
                    process,
                    server_state,
                    client_states,
                    sampled,
                    client_data_fn(round_num, seeds, examples),
                    learning_rate,
                )
            except simulation.RoundFailed as e:
                raise ProgramError(f"round {round_num}: {e}; fix the cause and run the same command again") from None
            client_states.update(new_client_states)
            if options.capture_rounds and capture_lib.captures_round(options.capture_rounds, round_num):
                run_meta = capture_lib.run_meta_fn(config, dataset.name, learning_rate, seeds, examples)
                capture_lib.save_round_captures(root_dir, round_num, layout, global_t, global_n, reports, run_meta)
            metrics = {k: (float(v) if isinstance(v, (float, np.floating)) else int(v)) for k, v in metrics.items()}
            metrics.update(learning_rate=float(learning_rate), seconds=time.time() - started)
            # Released before the state is saved: a resumed round releases again, replacing its rows.
            asyncio.run(metrics_manager.release(metrics, round_num))
            state_manager.save(round_num, server_state, client_states, changed=set(new_client_states))
            _show_round(progress, round_num, metrics)
    except BaseException:
        if options.progress:
            print(flush=True)  # ends the progress bar's line: the error that follows gets a line of its own
        raise
    return metrics


def _client_data_fn(root_dir, config, options, dataset):
    """`client_data_fn(round_num, seeds, examples)`: the round's `client_data(client_id)`, the client's
    batches of `examples[client_id]` (shuffled by `seeds[client_id]`; NaN or failing where `options`
    inject it)."""
    cache_dir = run_dir.client_data_dir(root_dir) if options.cache_client_data else None
    nan_at, fail_at = set(options.inject_nan), set(options.inject_failure)

    def client_data_fn(round_num, seeds, examples):
        def client_data(client_id):
            return client_dataset(
                config,
                dataset,
                examples[client_id],
                seeds[client_id],
                cache_dir,
                client_id,
                poison=(round_num, client_id) in nan_at,
                fail=(round_num, client_id) in fail_at,
            )

        return client_data

    return client_data_fn


def _progress_bar(options, start):
    progress = tf.keras.utils.Progbar(
        options.rounds,
        stateful_metrics=["loss", "accuracy", "rejected", "dropped", "s/round"],
        verbose=1 if options.progress else 0,
    )
    progress.update(min(start, options.rounds))
    return progress


def _show_round(progress, round_num, metrics):
    progress.update(
        round_num,
        [
            ("loss", metrics["loss"]),
            ("accuracy", metrics["accuracy"]),
            ("rejected", metrics["clients_rejected"]),
            ("dropped", metrics["clients_dropped"]),
            ("s/round", metrics["seconds"]),
        ],
    )
