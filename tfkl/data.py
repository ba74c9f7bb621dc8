"""Data sets, client splits (IID, Dirichlet, label shards) and tf.data pipelines.

Images come as float32 in [0, 1], channels last, in their native size; `preprocess` fits them to a
model's input shape (bilinear resize, grey <-> RGB) inside the pipeline.
"""

import collections
import gzip
import os
import pickle
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from tfkl.names import DATASETS, SPLITS

FASHION_MNIST_DIRS = ("~/.keras/datasets/fashion-mnist", "/usr/share/datasets/fashion-mnist")
_FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

Dataset = collections.namedtuple("Dataset", "name x_train y_train x_test y_test num_classes")


class DataUnavailableError(RuntimeError):
    """A data set that is neither on disk nor downloadable here."""


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated")
    return array.reshape(shape)


def _images(uint8_images):
    images = uint8_images.astype(np.float32) / 255.0
    return images[..., np.newaxis] if images.ndim == 3 else images


def _load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., np.newaxis]
    order = np.random.RandomState(0).permutation(len(images))
    train, test = order[:1437], order[1437:]
    labels = digits.target.astype(np.int64)
    return images[train], labels[train], images[test], labels[test]


def _load_fashion_mnist(data_dir):
    candidates = ([data_dir] if data_dir else []) + list(FASHION_MNIST_DIRS)
    for directory in map(os.path.expanduser, candidates):
        paths = [os.path.join(directory, name) for name in _FASHION_FILES]
        if all(os.path.exists(p) for p in paths):
            x_train, y_train, x_test, y_test = map(_read_idx, paths)
            return _images(x_train), y_train.astype(np.int64), _images(x_test), y_test.astype(np.int64)
    try:
        (x_train, y_train), (x_test, y_test) = tf.keras.datasets.fashion_mnist.load_data()
    except Exception as e:  # no network: say where the data can come from instead
        raise DataUnavailableError(
            "Fashion-MNIST not found in " + ", ".join(candidates) + f" and the download failed ({e}); "
            "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
            "or use --dataset=digits (bundled with scikit-learn)"
        ) from None
    return _images(x_train), y_train.astype(np.int64), _images(x_test), y_test.astype(np.int64)


def _keras_cache(data_dir):
    return os.path.expanduser(data_dir or "~/.keras/datasets")


# name -> (the file or folder the loader reads, the Keras loader's download URL, whether it is a tar.gz)
_DOWNLOADS = {
    "mnist": ("mnist.npz", "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz", False),
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", True),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", True),
}


def _fetched(name, data_dir):
    """The path of `name`'s file or folder in the Keras cache (or `data_dir`), downloaded there if absent.

    The download goes to a temporary directory first: offline, nothing is created, and the error says
    where the files go and how to fetch them on a connected machine.
    """
    entry, origin, untar = _DOWNLOADS[name]
    directory = _keras_cache(data_dir)
    path = os.path.join(directory, entry)
    if os.path.exists(path):
        return path
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fetched = tf.keras.utils.get_file(entry, origin, untar=untar, cache_dir=tmp, cache_subdir="")
        except Exception as e:  # offline: urllib, socket or HTTP errors
            raise DataUnavailableError(
                f"{name} needs {path}, which is missing, and could not be downloaded ({e}); on a "
                f"connected machine download {origin}" + (" and unpack it" if untar else "") + f", copy "
                f"{entry} into {directory} here, or pass --data_dir=DIR holding {entry}"
            ) from None
        os.makedirs(directory, exist_ok=True)
        shutil.move(fetched, path)
    return path


def _load_mnist(data_dir):
    with np.load(_fetched("mnist", data_dir)) as f:
        return _images(f["x_train"]), f["y_train"].astype(np.int64), _images(f["x_test"]), f["y_test"].astype(np.int64)


def _unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_images(batch):
    return _images(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _load_cifar(name, data_dir):
    root = _fetched(name, data_dir)
    if name == "cifar10":
        train = [_unpickle(os.path.join(root, f"data_batch_{i}")) for i in range(1, 6)]
        test = _unpickle(os.path.join(root, "test_batch"))
        label_key = b"labels"
    else:
        train, test, label_key = (
            [_unpickle(os.path.join(root, "train"))],
            _unpickle(os.path.join(root, "test")),
            b"fine_labels",
        )
    x_train = np.concatenate([_cifar_images(b) for b in train])
    y_train = np.concatenate([np.asarray(b[label_key], np.int64) for b in train])
    return x_train, y_train, _cifar_images(test), np.asarray(test[label_key], np.int64)


def _load_tfds(name, data_dir):
    import tensorflow_datasets as tfds

    arrays = []
    for split in ("train", "test"):
        batches = list(tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, as_supervised=True).batch(10_000)))
        images = np.concatenate([b[0] for b in batches]).astype(np.uint8)
        arrays += [_images(images), np.concatenate([b[1] for b in batches]).astype(np.int64)]
    return tuple(arrays)


_NUM_CLASSES = {"digits": 10, "fashion_mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100}


def load(name, data_dir=None, source="files"):
    """Loads a data set as numpy arrays.

    Args:
      name: one of DATASETS.
      data_dir: where the files are (default: the Keras cache, ~/.keras/datasets; for Fashion-MNIST
        also Debian's /usr/share/datasets/fashion-mnist).
      source: 'files' reads the Keras loaders' file formats (downloading them from the Keras loaders'
        URLs when absent; offline, DataUnavailableError says where they go), 'tfds' uses
        tensorflow_datasets with `data_dir`. 'digits' is always bundled.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    if source not in ("files", "tfds"):
        raise ValueError(f"source must be 'files' or 'tfds', got {source!r}")
    if name == "digits":
        arrays = _load_digits()
    elif source == "tfds":
        arrays = _load_tfds(name, data_dir)
    elif name == "fashion_mnist":
        arrays = _load_fashion_mnist(data_dir)
    elif name == "mnist":
        arrays = _load_mnist(data_dir)
    else:
        arrays = _load_cifar(name, data_dir)
    return Dataset(name, *arrays, num_classes=_NUM_CLASSES[name])


def preprocess(images, input_shape):
    """Fits a batch of [0, 1] images to `input_shape` (H, W, C): bilinear resize and grey <-> RGB."""
    images = tf.convert_to_tensor(images, tf.float32)
    height, width, channels = input_shape
    if images.shape[1] != height or images.shape[2] != width:
        images = tf.image.resize(images, (height, width))
    if images.shape[-1] != channels:
        if channels == 3 and images.shape[-1] == 1:
            images = tf.image.grayscale_to_rgb(images)
        elif channels == 1 and images.shape[-1] == 3:
            images = tf.image.rgb_to_grayscale(images)
        else:
            raise ValueError(f"cannot map {images.shape[-1]} channels to {channels}")
    return images


def split(labels, num_clients, method="iid", seed=0, alpha=0.5, shards_per_client=2):
    """Splits example indices among `num_clients`; deterministic for a seed.

    'iid': a random partition into equal parts; 'dirichlet': per-class proportions drawn from
    Dirichlet(alpha); 'shards': examples sorted by label cut into num_clients * shards_per_client
    shards, each client taking `shards_per_client` of them. Every client gets at least one example.
    """
    labels = np.asarray(labels)
    num_clients = int(num_clients)
    if num_clients < 1 or num_clients > len(labels):
        raise ValueError(f"num_clients must be in [1, {len(labels)}], got {num_clients}")
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_clients)
    elif method == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        buckets = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(members)).astype(int)[:-1]
            for bucket, chunk in zip(buckets, np.split(members, cuts)):
                bucket.extend(chunk)
        parts = [np.array(sorted(b), dtype=np.int64) for b in buckets]
        # Move one example to any empty client from the largest one.
        for i, part in enumerate(parts):
            if not len(part):
                largest = max(range(num_clients), key=lambda j: len(parts[j]))
                parts[i], parts[largest] = parts[largest][-1:], parts[largest][:-1]
    elif method == "shards":
        num_shards = num_clients * int(shards_per_client)
        if num_shards > len(labels):
            raise ValueError(f"{num_shards} shards for {len(labels)} examples")
        order = np.argsort(labels, kind="stable")
        shards = np.array_split(order, num_shards)
        assignment = rng.permutation(num_shards).reshape(num_clients, int(shards_per_client))
        parts = [np.concatenate([shards[s] for s in row]) for row in assignment]
    else:
        raise ValueError(f"split must be one of {SPLITS}, got {method!r}")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def split_test(dataset, public_size, seed):
    """(public indices, evaluation indices) of the test split, cut once per seed: the public part
    (at most half) is what an attacker may hold, the rest is where every accuracy is measured."""
    order = np.random.default_rng([int(seed), 0x7E57]).permutation(len(dataset.y_test))
    public_size = min(int(public_size), len(order) // 2)
    return order[:public_size], order[public_size:]


def make_dataset(images, labels, input_shape, batch_size, shuffle_seed=None, repeat=1):
    """A tf.data pipeline of (images, labels) batches fitted to `input_shape`."""
    if len(images) == 0:
        raise ValueError("no examples: the client's data is empty")
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.repeat(repeat).batch(batch_size)
    return dataset.map(lambda x, y: (preprocess(x, input_shape), y), num_parallel_calls=tf.data.AUTOTUNE)
