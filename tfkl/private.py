"""The private/shared split of a secured model's variables, keys, private lock draws and server-safe export."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import tensorflow as tf

from tfkl import keys as keys_lib
from tfkl.keylock import KeyLock, draw_lock_seed


def lock_layers(model: tf.keras.Model | KeyLock) -> list[KeyLock]:
    """All KeyLock layers of `model` (or `model` itself, if a KeyLock), nested models included, in a stable order."""
    if isinstance(model, KeyLock):
        return [model]
    return [layer for layer in model.submodules if isinstance(layer, KeyLock)]


def draw_lock_weights(model: tf.keras.Model | KeyLock, seed=None) -> list[np.ndarray]:
    """Fresh lock weights for every lock of `model` (a model or one KeyLock): a client's private
    starting lock, which no server can rebuild.

    Drawn from each lock's uniform lock initialiser's distribution with the CSPRNG
    (`tfkl.keys.secret_uniform`; a seed only for experiments). Flat in `lock_layers` order, each
    lock's `lock_weights`, float32 numpy arrays: (scale kernel, scale bias, shift kernel, shift
    bias), or for a compact lock a fresh seed of its initial kernels, its lock key (zeros: with zero
    deltas it does not matter), gains 1, zero deltas and fresh biases.
    """
    weights = []
    for index, lock in enumerate(lock_layers(model)):
        low, high = lock.uniform_range()

        def uniform(shape, weight_index, index=index, low=low, high=high):
            unit = keys_lib.secret_uniform(shape, None if seed is None else list(seed) + [index, weight_index])
            return (low + (high - low) * unit).astype(np.float32)

        if lock.kernel == "full":
            weights += [uniform(v.shape, i) for i, v in enumerate(lock.lock_weights)]
            continue
        lock_seed = draw_lock_seed(None if seed is None else list(seed) + [index, 0])
        size = (2, lock.affine_size)
        key = np.zeros(lock.key_dim, np.float32)
        weights += [lock_seed, key, np.ones(2, np.float32), np.zeros(size, np.float32), uniform(size, 1)]
    return weights


def _require_locks(model):
    locks = lock_layers(model)
    if not locks:
        raise ValueError(f"model {model.name!r} has no KeyLock layer; secure it first (tfkl.secure)")
    if not all(lock.built for lock in locks):
        raise ValueError(f"model {model.name!r} is not built; call it on an input first")
    return locks


def private_variables(model: tf.keras.Model) -> list[tf.Variable]:
    """The client's secret variables: every lock's key and lock weights, and a compact lock's cache
    of its key projection (derived from them: never shared, never stored)."""
    return [v for lock in lock_layers(model) if lock.built for v in lock.private_weights + lock.cache_weights]


def shared_variables(model: tf.keras.Model) -> list[tf.Variable]:
    """Every other variable of `model` (trainable and not), in `model.variables` order."""
    private = {id(v) for v in private_variables(model)}
    return [v for v in model.variables if id(v) not in private]


def set_key(model: tf.keras.Model, key: np.ndarray) -> None:
    """Sets the one client key used by every KeyLock of `model`."""
    for lock in _require_locks(model):
        lock.key.assign(keys_lib.validate_key(key, lock.key_dim))


def get_key(model: tf.keras.Model) -> np.ndarray:
    """Returns the model's key (a float32 vector); every lock of a model shares it."""
    return _require_locks(model)[0].key.numpy()


def export_shared(model: tf.keras.Model, directory: str) -> None:
    """Writes what a server may hold: the architecture and the shared weights, no key, no lock.

    The directory gets `model.json` (Keras architecture; the key is never part of a config) and
    `shared.npz` (the shared variables in `shared_variables` order, with their names).
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"export_shared writes a directory; {directory} is a file")
    os.makedirs(directory, exist_ok=True)
    shared = shared_variables(model)
    arrays = {f"v{i:05d}": v.numpy() for i, v in enumerate(shared)}
    arrays["names"] = np.array([v.name for v in shared])
    with open(os.path.join(directory, "model.json"), "w") as f:
        f.write(model.to_json())
    np.savez(os.path.join(directory, "shared.npz"), **arrays)


def load_shared(directory: str) -> tf.keras.Model:
    """Loads an `export_shared` directory: shared weights set, every private variable zero.

    Zero lock weights give gamma = beta = 0 under ReLU, as the paper's global model has; set a
    key and lock weights (or fine-tune them) to use the model. A missing or corrupt export raises
    ValueError.
    """
    try:
        with open(os.path.join(directory, "model.json")) as f:
            model = tf.keras.models.model_from_json(f.read())
        with np.load(os.path.join(directory, "shared.npz"), allow_pickle=False) as arrays:
            stored = [arrays[f"v{i:05d}"] for i in range(len(arrays.files) - 1)]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{directory} is not a readable export_shared directory ({type(e).__name__}: {e})") from None
    shared = shared_variables(model)
    if [a.shape for a in stored] != [tuple(v.shape) for v in shared]:
        raise ValueError(f"{directory}: shared.npz does not match the architecture in model.json")
    for value, variable in zip(stored, shared):
        variable.assign(value)
    for variable in private_variables(model):
        variable.assign(tf.zeros_like(variable))
    return model
