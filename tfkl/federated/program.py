"""A resumable federated training program (tff.program): server state, client states, metrics.

Under `root_dir`:
  config.json          the run's configuration; another run's root dir is refused
  server/              tff.program.FileProgramStateManager: server state per saved round
  clients/             tfkl.federated.client_store.ClientStore: private client states per round
  metrics.csv, tensorboard/   per-round metrics (CSV and TensorBoard release managers)
  captures/            optional: what a curious server received (tfkl.capture format)
  client_data/         each client's examples as a tf.data snapshot (the round ships their path)
Client states are saved before the server state, so a round is complete when both exist; a resumed
run starts from the last complete round and gives the same result as an uninterrupted one.
"""

import asyncio
import collections
import dataclasses
import functools
import json
import logging
import multiprocessing
import os
import sys
import time

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tfkl import capture as capture_lib
from tfkl import data as data_lib
from tfkl import keys as keys_lib
from tfkl import models, optimizers, private
from tfkl.federated import algorithms, simulation
from tfkl.federated.client_store import ClientStateError, ClientStore
from tfkl.files import atomic_write

logger = logging.getLogger(__name__)
CONFIG_FILE = "config.json"


def ignore_tff_exit_noise():
    """Hides TFF 0.87's `ServiceManager.__del__` AttributeError printed at interpreter exit.

    It is harmless (the binaries stop their TFF workers with contexts.shutdown()) but would turn a
    one-line error into a traceback. Other unraisable exceptions are reported as before.
    """
    default_hook = sys.unraisablehook

    def hook(unraisable):
        if "ServiceManager.__del__" not in getattr(unraisable.object, "__qualname__", ""):
            default_hook(unraisable)

    sys.unraisablehook = hook


class ProgramError(RuntimeError):
    """A run that cannot start or resume (bad root dir, corrupt state); one-line message."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run (the parts that must match to resume it)."""
    algorithm: str = "fedkl"
    model: str = "lenet"
    dataset: str = "digits"
    data_dir: str = None
    input_shape: tuple = (32, 32, 1)
    num_classes: int = 10
    num_clients: int = 3
    clients_per_round: int = 3
    local_epochs: int = 1
    batch_size: int = 64
    split: str = "iid"
    alpha: float = 0.5
    learning_rate: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_milestones: tuple = (60, 120, 160)
    lr_gamma: float = 0.2
    server_learning_rate: float = 1.0
    persist_optimizer_state: bool = True
    statistics: str = "average"
    client_weighting: str = "num_examples"
    key_dim: int = 1024
    normalization: str = "batch"
    init: str = "pytorch"
    seed: int = 0
    seeded_keys: bool = False
    lock_where: str = "first"            # FedKL: the layers to lock ('first', 'all'; see tfkl.secure)
    lock_init: str = "shared"            # FedKL: clients start from model_fn's lock weights (the paper) or
                                         # 'private' ones each draws from the CSPRNG (the server cannot know them)
    dp_clip: float = None                # DP-FedAvg (TFF's gaussian_fixed): clip of each client's update
    dp_noise_multiplier: float = 0.0     # ... and the noise stddev on the sum, in units of dp_clip
    prune_fraction: float = None         # each client zeroes this fraction of its smallest update entries

    def to_json(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def locked(self):
        return self.algorithm == "fedkl"

    def model_fn(self):
        shape, classes, seed = tuple(self.input_shape), self.num_classes, self.seed
        options = dict(init=self.init, seed=seed)
        if self.locked:
            options.update(key_dim=self.key_dim, normalization=self.normalization, where=self.lock_where)
        return lambda: models.build(self.model, shape, classes, lock=self.locked, **options)

    def client_optimizer(self):
        return optimizers.TorchSGD(self.learning_rate, self.momentum, self.nesterov, self.weight_decay)

    def round_learning_rate(self, round_num):
        """The client LR of (1-based) `round_num`: x lr_gamma at each milestone round passed."""
        return optimizers.multistep_learning_rate(self.learning_rate, self.lr_milestones, self.lr_gamma,
                                                  round_num - 1)

    def client_key(self, client_id):
        """A fresh CSPRNG key; with `seeded_keys` (experiments only) derived from the seed."""
        seed = [self.seed, int(client_id), 0x6B6579] if self.seeded_keys else None
        return keys_lib.generate_key(self.key_dim, seed=seed)

    def client_lock_fn(self):
        """client id -> the client's initial lock weights: None (model_fn's, lock_init='shared') or
        fresh CSPRNG ones (lock_init='private'; with `seeded_keys` derived from the seed)."""
        if self.lock_init not in LOCK_INITS:
            raise ValueError(f"lock_init must be one of {LOCK_INITS}, got {self.lock_init!r}")
        if not self.locked or self.lock_init == "shared":
            return lambda client_id: None
        model = self.model_fn()()
        return lambda client_id: private.draw_lock_weights(
            model, [self.seed, int(client_id), 0x6C6F636B] if self.seeded_keys else None)


LOCK_INITS = ("shared", "private")


# Fields that change the data or the schedule but not the process's computations.
_DRIVER_FIELDS = dict(dataset="", data_dir=None, num_clients=1, clients_per_round=1, local_epochs=1, batch_size=1,
                      split="iid", alpha=1.0, learning_rate=1.0, lr_milestones=(), lr_gamma=1.0, seeded_keys=False,
                      lock_init="shared")


def build_process(config, return_client_updates=False):
    """The run's process (cached: building traces the model and takes seconds)."""
    driver_fields = dict(_DRIVER_FIELDS)
    if config.dp_clip is not None:
        del driver_fields["clients_per_round"]  # DP's mean divides by it
    return _build_process(dataclasses.replace(config, **driver_fields), bool(return_client_updates))


@functools.lru_cache(maxsize=4)
def _build_process(config, return_client_updates):
    builder = algorithms.build_fedkl_process if config.locked else algorithms.build_fedavg_process
    return builder(config.model_fn(), config.client_optimizer(),
                   tff.learning.optimizers.build_sgdm(learning_rate=config.server_learning_rate),
                   client_weighting=config.client_weighting, statistics=config.statistics,
                   persist_optimizer_state=config.persist_optimizer_state,
                   return_client_updates=return_client_updates, model_aggregator=model_aggregator(config),
                   client_update_transform=None if config.prune_fraction is None else
                   algorithms.prune_smallest(config.prune_fraction))


def model_aggregator(config):
    """DP-FedAvg's aggregator when `dp_clip` is set (TFF's fixed-clip Gaussian mean), else None."""
    if config.dp_clip is None:
        return None
    if config.client_weighting != "uniform":
        raise ProgramError("DP-FedAvg weights clients uniformly: set client_weighting='uniform'")
    return tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
        noise_multiplier=float(config.dp_noise_multiplier), clients_per_round=float(config.clients_per_round),
        clip=float(config.dp_clip))


def client_partition(config, dataset):
    """Each client's training example indices (deterministic per seed)."""
    return data_lib.split(dataset.y_train, config.num_clients, config.split, seed=config.seed, alpha=config.alpha)


def check_config(root_dir, config):
    """Writes config.json in a new (or empty) root dir; refuses one holding another run or other files."""
    path = os.path.join(root_dir, CONFIG_FILE)
    wanted = config.to_json()
    if os.path.exists(path):
        try:
            with open(path) as f:
                stored = json.load(f)
        except (OSError, ValueError) as e:
            raise ProgramError(f"{path} is unreadable ({e}); not touching this root dir") from None
        # A field added since the run started counts as its default there.
        stored = {**Config().to_json(), **stored}
        differing = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        if differing:
            k = differing[0]
            raise ProgramError(f"{root_dir} holds another run ({k}: {stored.get(k)!r} there, {wanted.get(k)!r} "
                               f"here); use a new --root_dir")
        return
    if os.path.isdir(root_dir) and os.listdir(root_dir):
        raise ProgramError(f"{root_dir} is not empty and holds no {CONFIG_FILE}; use a new --root_dir")
    os.makedirs(root_dir, exist_ok=True)
    with atomic_write(path, binary=False) as f:
        json.dump(wanted, f, indent=1)


def load_config(root_dir):
    path = os.path.join(root_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            stored = json.load(f)
        fields = {f.name for f in dataclasses.fields(Config)}
        return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in fields})
    except (OSError, ValueError, TypeError) as e:
        raise ProgramError(f"{root_dir} is not a training run's root dir ({CONFIG_FILE}: {e})") from None


def _flat(structure):
    return [np.asarray(x) for x in tf.nest.flatten(structure)]


def complete_rounds(root_dir):
    """The rounds whose server and client states are both on disk, in order."""
    server_manager = tff.program.FileProgramStateManager(os.path.join(root_dir, "server"), keep_total=0)
    versions = asyncio.run(server_manager.get_versions()) or []
    return sorted(set(versions) & set(ClientStore(os.path.join(root_dir, "clients")).rounds()))


def restore(root_dir, config, process, round_num=None):
    """(server_state, client_states, round) of the last complete round (or `round_num`); None if none."""
    server_manager = tff.program.FileProgramStateManager(os.path.join(root_dir, "server"), keep_total=0)
    store = ClientStore(os.path.join(root_dir, "clients"))
    template = process.initialize()
    if round_num is None:
        rounds = complete_rounds(root_dir)
        if not rounds:
            return None
        round_num = rounds[-1]
    try:
        loaded = asyncio.run(server_manager.load(int(round_num), template))
        server_state = tf.nest.pack_sequence_as(template, _flat(loaded))
    except tff.program.ProgramStateNotFoundError:
        raise ProgramError(f"no server state for round {round_num} in {root_dir}/server") from None
    except Exception as e:  # a corrupt SavedModel raises many kinds of errors
        raise ProgramError(f"server state of round {round_num} in {root_dir}/server is unreadable: "
                           f"{type(e).__name__}") from None
    if [np.shape(x) for x in _flat(server_state)] != [np.shape(x) for x in _flat(template)]:
        raise ProgramError(f"server state of round {round_num} does not fit the model in {CONFIG_FILE}")
    try:
        client_states = store.load(round_num, config.key_dim if config.locked else None)
    except ClientStateError as e:
        raise ProgramError(str(e)) from None
    if sorted(client_states, key=int) != [str(i) for i in range(config.num_clients)]:
        raise ProgramError(f"client states of round {round_num} do not match --num_clients={config.num_clients}")
    template_client = process.client_state_type
    for cid, state in client_states.items():
        client_states[cid] = collections.OrderedDict(
            (k, [np.asarray(a) for a in state[k]]) for k in ("key", "lock", "optimizer", "statistics"))
        if [len(v) for v in client_states[cid].values()] != [len(template_client[k]) for k in client_states[cid]]:
            raise ProgramError(f"client {cid}'s state of round {round_num} does not fit the run's options")
    return server_state, client_states, int(round_num)


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


def client_dataset(config, dataset, indices, shuffle_seed, cache_dir=None, client_id=None, poison=False,
                   fail=False):
    """One client's local data for one round: shuffled, batched per epoch, repeated `local_epochs`.

    With `cache_dir` the client's examples are read from a tf.data snapshot there (written once):
    the round then ships a file path to the TFF worker instead of the examples. `poison` turns the
    images into NaN and `fail` makes the local training raise mid-epoch (fault injection).
    """
    if cache_dir is None:
        examples = tf.data.Dataset.from_tensor_slices((dataset.x_train[indices], dataset.y_train[indices]))
    else:
        path = os.path.join(cache_dir, f"client_{client_id}")
        if not os.path.isdir(path):
            tmp = f"{path}.tmp"
            if os.path.isdir(tmp):
                tf.io.gfile.rmtree(tmp)
            tf.data.Dataset.from_tensor_slices((dataset.x_train[indices], dataset.y_train[indices])).save(tmp)
            os.replace(tmp, path)
        examples = tf.data.Dataset.load(path, reader_func=_snapshot_reader)
    examples = examples.shuffle(len(indices), seed=shuffle_seed, reshuffle_each_iteration=True)
    batches = _batcher(config.batch_size, config.local_epochs, tuple(config.input_shape))(examples)
    if poison:
        batches = batches.map(lambda x, y: (x * np.float32(np.nan), y))
    if fail:
        batches = _fail_after(batches, config.local_epochs * -(-len(indices) // config.batch_size) // 2)
    return batches.with_options(_CLIENT_DATA_OPTIONS)


# Dataset.load's default reader, traced once: tf.data would trace a new one for every client.
_snapshot_reader = tf.function(lambda shards: shards.interleave(
    lambda shard: shard, cycle_length=multiprocessing.cpu_count(), num_parallel_calls=tf.data.AUTOTUNE))


@functools.lru_cache(maxsize=8)
def _batcher(batch_size, local_epochs, input_shape):
    """Batched per epoch, then repeated (reshuffled): each epoch ends with its own partial batch.

    Traced once per layout: a client's data set then costs a few ops, not a trace of the preprocessing.
    """
    @tf.function
    def batch(examples):
        batches = examples.batch(batch_size).map(lambda x, y: (data_lib.preprocess(x, input_shape), y))
        return batches.repeat(local_epochs)
    return batch


# A client's pipeline is small and read once per round: tf.data's graph rewrites and autotuning
# would cost each client more (in the TFF worker) than they save.
_CLIENT_DATA_OPTIONS = tf.data.Options()
_CLIENT_DATA_OPTIONS.experimental_optimization.apply_default_optimizations = False
_CLIENT_DATA_OPTIONS.autotune.enabled = False


def _initial_key(config, store, client_id):
    """A new client's key; one already on disk comes from an initialisation interrupted before the
    server state was saved, and is kept."""
    if not config.locked:
        return None
    try:
        saved = store.saved_key(client_id, config.key_dim)
    except ClientStateError as e:
        raise ProgramError(str(e)) from None
    return config.client_key(client_id) if saved is None else saved


def _fail_after(dataset, steps):
    """Fault injection: the client's local training raises after `steps` batches (inside the round)."""
    def check(index, batch):
        with tf.control_dependencies([tf.debugging.assert_less(index, tf.constant(steps, tf.int64),
                                                               message="injected client failure")]):
            return tf.nest.map_structure(tf.identity, batch)
    return dataset.enumerate().map(check)


def train(root_dir, config, options, dataset=None):
    """Runs (or resumes) training to `options.rounds`; returns the final round's metrics."""
    dataset = dataset or data_lib.load(config.dataset, config.data_dir)
    try:
        partition = client_partition(config, dataset)
    except ValueError as e:
        raise ProgramError(f"cannot split the data among the clients: {e}") from None
    check_config(root_dir, config)
    capture = bool(options.capture_rounds)
    process = build_process(config, return_client_updates=capture)
    restored = restore(root_dir, config, process)
    server_manager = tff.program.FileProgramStateManager(os.path.join(root_dir, "server"),
                                                         keep_total=options.keep_rounds + 1, keep_first=True)
    store = ClientStore(os.path.join(root_dir, "clients"))
    csv_manager = tff.program.CSVFileReleaseManager(os.path.join(root_dir, "metrics.csv"), key_fieldname="round")
    tensorboard = tff.program.TensorBoardReleaseManager(os.path.join(root_dir, "tensorboard"))
    if restored is None:
        server_state = process.initialize()
        client_lock = config.client_lock_fn()
        client_states = {str(c): process.initial_client_state(_initial_key(config, store, c), client_lock(c))
                         for c in range(config.num_clients)}
        start = 0
        store.save(0, client_states, changed=set(client_states))
        asyncio.run(server_manager.save(server_state, 0))
    else:
        server_state, client_states, start = restored
        logger.info("resuming %s after round %d", root_dir, start)
        if options.progress:
            print(f"resuming {root_dir} after round {start} (the last complete one)")
    layout = capture_lib.SharedLayout(config.model_fn()(), process.parts)
    cache_dir = os.path.join(os.path.abspath(root_dir), "client_data") if options.cache_client_data else None
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
            server_state, metrics, reports = simulation.run_round(
                process, server_state, client_states, sampled, client_data, learning_rate)
        except simulation.RoundFailed as e:
            raise ProgramError(f"round {round_num}: {e}; fix the cause and run the same command again") from None
        if capture and capture_lib.captures_round(options.capture_rounds, round_num):
            capture_lib.save_round_captures(root_dir, round_num, layout, global_t, global_n, reports,
                                            capture_lib.run_meta_fn(config, dataset.name, learning_rate, seeds,
                                                                    partition))
        metrics = {k: (float(v) if isinstance(v, (float, np.floating)) else int(v)) for k, v in metrics.items()}
        metrics.update(learning_rate=float(learning_rate), seconds=time.time() - started)
        # Released before the state is saved: a resumed round releases again, replacing its rows.
        asyncio.run(csv_manager.release(metrics, round_num))
        asyncio.run(tensorboard.release(metrics, round_num))
        store.save(round_num, client_states, changed=set(reports))
        asyncio.run(server_manager.save(server_state, round_num))
        rounds = store.rounds()
        store.prune(set(rounds[-options.keep_rounds:]) | {0})  # the rounds the server manager keeps
        progress.update(round_num, [("loss", metrics["loss"]), ("accuracy", metrics["accuracy"]),
                                    ("rejected", metrics["clients_rejected"]),
                                    ("dropped", metrics["clients_dropped"]), ("s/round", metrics["seconds"])])
    return metrics
