import gzip
import os
import pickle

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import write_idx
from tfkl import data


def test_fashion_mnist_reads_idx_files_from_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 256, (6, 28, 28)),
        rng.integers(0, 10, 6),
        rng.integers(0, 256, (4, 28, 28)),
        rng.integers(0, 10, 4),
    ]
    for name, array in zip(data._FASHION_FILES, arrays):
        write_idx(tmp_path / name, array)
    dataset = data.load("fashion_mnist", data_dir=str(tmp_path))
    assert dataset.x_train.shape == (6, 28, 28, 1) and dataset.x_test.shape == (4, 28, 28, 1)
    np.testing.assert_allclose(dataset.x_train[..., 0], arrays[0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(dataset.y_test, arrays[3])


def test_truncated_idx_file_is_an_error(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="truncated"):
        data._read_idx(str(path))


def test_mnist_npz_in_the_keras_format(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(
        tmp_path / "mnist.npz",
        x_train=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        y_train=np.arange(5),
        x_test=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        y_test=np.arange(3),
    )
    dataset = data.load("mnist", data_dir=str(tmp_path))
    assert dataset.x_train.shape == (5, 28, 28, 1) and dataset.x_train.max() <= 1.0
    np.testing.assert_array_equal(dataset.y_train, np.arange(5))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_in_the_keras_format(tmp_path, name):
    rng = np.random.default_rng(2)
    label_key = b"labels" if name == "cifar10" else b"fine_labels"

    def batch(n):
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: list(rng.integers(0, 10, n))}

    if name == "cifar10":
        root = tmp_path / "cifar-10-batches-py"
        files = {f"data_batch_{i}": batch(2) for i in range(1, 6)} | {"test_batch": batch(3)}
    else:
        root = tmp_path / "cifar-100-python"
        files = {"train": batch(4), "test": batch(3)}
    os.makedirs(root)
    for file_name, content in files.items():
        with open(root / file_name, "wb") as f:
            pickle.dump(content, f)
    dataset = data.load(name, data_dir=str(tmp_path))
    assert dataset.x_test.shape == (3, 32, 32, 3)
    # Channel-major CIFAR rows become channels-last images.
    first = files["test_batch" if name == "cifar10" else "test"][b"data"][0]
    np.testing.assert_allclose(dataset.x_test[0, 0, 0], first[[0, 1024, 2048]] / 255.0, rtol=1e-6)
    assert dataset.num_classes == (10 if name == "cifar10" else 100)


def test_tfds_source_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        dataset = data.load("mnist", data_dir=str(tmp_path), source="tfds")
    assert dataset.x_train.shape == (6, 28, 28, 1) and dataset.x_train.dtype == np.float32
    assert dataset.y_train.shape == (6,)


def test_missing_fashion_mnist_names_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", ())

    def offline():
        raise OSError("no network")

    monkeypatch.setattr(tf.keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(data.DataUnavailableError, match="dataset-fashion-mnist.*--dataset=digits"):
        data.load("fashion_mnist", data_dir=str(tmp_path))


def test_digits_is_bundled_and_unknown_names_fail():
    dataset = data.load("digits")
    assert dataset.x_train.shape == (1437, 8, 8, 1) and len(dataset.x_test) == 360
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet")


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_splits_partition_every_example_deterministically(method):
    labels = np.repeat(np.arange(10), 30)
    parts = data.split(labels, 7, method, seed=4, alpha=0.3)
    assert len(parts) == 7 and all(len(p) for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    again = data.split(labels, 7, method, seed=4, alpha=0.3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_shards_give_few_labels_and_iid_many():
    labels = np.repeat(np.arange(10), 100)
    shards = data.split(labels, 10, "shards", seed=0, shards_per_client=2)
    assert max(len(np.unique(labels[p])) for p in shards) <= 2
    iid = data.split(labels, 10, "iid", seed=0)
    assert min(len(np.unique(labels[p])) for p in iid) >= 8


def test_bad_split_arguments():
    with pytest.raises(ValueError, match="num_clients"):
        data.split(np.arange(3), 4)
    with pytest.raises(ValueError, match="split must be"):
        data.split(np.arange(3), 2, "random")


def test_pipeline_fits_the_model_input_and_rejects_empty_clients():
    images = np.random.default_rng(0).random((5, 28, 28, 1), np.float32)
    batches = list(data.make_dataset(images, np.arange(5), (32, 32, 3), batch_size=2))
    assert [b[0].shape for b in batches] == [(2, 32, 32, 3), (2, 32, 32, 3), (1, 32, 32, 3)]
    with pytest.raises(ValueError, match="empty"):
        data.make_dataset(images[:0], np.arange(0), (32, 32, 3), batch_size=2)
