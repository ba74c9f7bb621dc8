"""Each client's local data: its share of the training set, its per-round pipeline, and fault injection."""

import functools
import hashlib
import logging
import os

import numpy as np
import tensorflow as tf

from tfkl import data as data_lib


def client_partition(config, dataset):
    """Each client's training example indices (deterministic per seed)."""
    return data_lib.split(dataset.y_train, config.num_clients, config.split, seed=config.seed, alpha=config.alpha)


def round_examples(config, indices, client_id, round_num):
    """The examples client `client_id` trains on in `round_num`: its partition `indices`, or with
    `examples_per_client` at most that many of them (kept in the partition's order), drawn from the
    seed once, or each round anew with `fresh_examples`."""
    indices = np.asarray(indices)
    size = config.examples_per_client
    if size is None or size >= len(indices):
        return indices
    seed = [int(config.seed), int(client_id), 0x5B5E7] + ([int(round_num)] if config.fresh_examples else [])
    return indices[np.sort(np.random.default_rng(seed).choice(len(indices), size, replace=False))]


def client_dataset(config, dataset, indices, shuffle_seed, cache_dir=None, client_id=None, poison=False, fail=False):
    """One client's local data for one round: shuffled, batched per epoch, repeated `local_epochs`.

    With `cache_dir` the client's examples are read from a file there (written on its first use): the
    round then ships a file path to the TFF worker instead of the examples. A subset of the partition
    (`examples_per_client`) has a file named by its indices; a fresh one each round (`fresh_examples`)
    is used once, so it is not cached. `poison` turns the images into NaN and `fail` makes the local
    training raise mid-epoch (fault injection).
    """
    if cache_dir is None or config.fresh_examples:
        examples = tf.data.Dataset.from_tensor_slices((dataset.x_train[indices], dataset.y_train[indices]))
    else:
        path = _cache_path(config, cache_dir, client_id, indices)
        if not _cache_is_sound(path, len(indices)):
            _write_examples(path, dataset.x_train[indices], dataset.y_train[indices])
        x, y = dataset.x_train, dataset.y_train
        examples = _examples_reader(x.shape[1:], x.dtype.name, y.dtype.name)(tf.constant(path))
    examples = examples.shuffle(len(indices), seed=shuffle_seed, reshuffle_each_iteration=True)
    batches = _batcher(config.batch_size, config.local_epochs, tuple(config.input_shape))(examples)
    if poison:
        batches = batches.map(lambda x, y: (x * np.float32(np.nan), y))
    if fail:
        batches = _fail_after(batches, config.local_epochs * -(-len(indices) // config.batch_size) // 2)
    return batches.with_options(_CLIENT_DATA_OPTIONS)


def _cache_path(config, cache_dir, client_id, indices):
    """A client's cache file: its whole partition's, or with `examples_per_client` one named by the
    subset's indices (never taken for the partition's, nor for another subset's)."""
    name = f"client_{client_id}"
    if config.examples_per_client is not None:
        name += "_" + hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{name}.tfrecord")


def _write_examples(path, images, labels):
    """A client's examples as a TFRecord file: per chunk of `_CHUNK` examples, a record of its images
    and one of its labels (serialized tensors); written atomically. (tf.data's Dataset.save and
    Dataset.load, used before, keep every call's functions in the process: 0.36 MB per client saved,
    0.1 MB per client read, each round.)"""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with tf.io.TFRecordWriter(tmp) as writer:
        for start in range(0, len(labels), _CHUNK):
            for array in (images[start : start + _CHUNK], labels[start : start + _CHUNK]):
                writer.write(tf.make_tensor_proto(array).SerializeToString())
    os.replace(tmp, path)


_CHUNK = 1024  # examples per record pair: a large client's file is read as it goes, not parsed whole first
_SOUND = set()  # (path, inode, size, mtime) of the cache files this process has read through once


def _cache_is_sound(path, num_examples):
    """Whether a client's cache file exists whole: read through once per process and version of the file (the
    records' checksums and their count); a damaged one (truncated, say) is logged, then written again."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return False
    version = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if version in _SOUND:
        return True
    try:
        records = sum(1 for _ in tf.data.TFRecordDataset(path))
    except tf.errors.OpError:
        records = -1
    if records == 2 * -(-num_examples // _CHUNK):
        _SOUND.add(version)
        return True
    logging.getLogger(__name__).warning("client data cache %s is damaged: writing it again", path)
    return False


@functools.lru_cache(maxsize=8)
def _examples_reader(image_shape, image_dtype, label_dtype):
    """path -> the examples of a file `_write_examples` wrote; traced once per layout, so that reading
    a client's file adds nothing to the process (a tf.data function made per call would stay)."""
    image_shape = tuple(image_shape)
    image_dtype, label_dtype = tf.dtypes.as_dtype(image_dtype), tf.dtypes.as_dtype(label_dtype)

    def parse(records):
        images = tf.ensure_shape(tf.io.parse_tensor(records[0], image_dtype), (None,) + image_shape)
        labels = tf.ensure_shape(tf.io.parse_tensor(records[1], label_dtype), (None,))
        return images, labels

    @tf.function(input_signature=[tf.TensorSpec((), tf.string)])
    def read(path):
        return tf.data.TFRecordDataset(path).batch(2).map(parse).unbatch()

    return read


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
