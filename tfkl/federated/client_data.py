"""Each client's local data: its share of the training set, its per-round pipeline, and fault injection."""

import functools
import multiprocessing
import os

import numpy as np
import tensorflow as tf

from tfkl import data as data_lib


def client_partition(config, dataset):
    """Each client's training example indices (deterministic per seed)."""
    return data_lib.split(dataset.y_train, config.num_clients, config.split, seed=config.seed, alpha=config.alpha)


def client_dataset(config, dataset, indices, shuffle_seed, cache_dir=None, client_id=None, poison=False, fail=False):
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
_snapshot_reader = tf.function(
    lambda shards: shards.interleave(
        lambda shard: shard, cycle_length=multiprocessing.cpu_count(), num_parallel_calls=tf.data.AUTOTUNE
    )
)


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


def _fail_after(dataset, steps):
    """Fault injection: the client's local training raises after `steps` batches (inside the round)."""

    def check(index, batch):
        with tf.control_dependencies(
            [tf.debugging.assert_less(index, tf.constant(steps, tf.int64), message="injected client failure")]
        ):
            return tf.nest.map_structure(tf.identity, batch)

    return dataset.enumerate().map(check)
