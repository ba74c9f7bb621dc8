"""Securing a model: `secure()` puts KeyLock blocks into an existing Sequential or functional Keras model.

`node_call_arguments` serves any code that re-runs a functional model's graph node by node (as
`secure` does here and the attacker's functional model does in attacks/model.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tfkl.keylock import AffineNorm, KeyLock
from tfkl.keys import generate_key, validate_key

_LOCKABLE = (
    tf.keras.layers.Conv1D,
    tf.keras.layers.Conv2D,
    tf.keras.layers.Conv3D,
    tf.keras.layers.DepthwiseConv2D,
    tf.keras.layers.SeparableConv2D,
    tf.keras.layers.Dense,
)


def lockable_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """Conv and dense layers of `model` in topological order, excluding those producing outputs."""
    outputs = {id(t) for t in model.outputs}
    return [
        layer
        for layer in model.layers
        if isinstance(layer, _LOCKABLE)
        and not any(id(t) in outputs for node in layer.inbound_nodes for t in tf.nest.flatten(node.outputs))
    ]


def _graph_model(model):
    if not isinstance(model, tf.keras.Model):
        raise TypeError(f"secure() needs a Keras model, got {type(model).__name__}")
    if not getattr(model, "_is_graph_network", False):
        raise TypeError(
            f"secure() supports Sequential and functional models; {type(model).__name__!r} is subclassed "
            "(or a Sequential without an input shape): insert tfkl.KeyLock in its call() instead"
        )
    if any(isinstance(layer, (KeyLock, AffineNorm)) for layer in model.submodules):
        raise ValueError(f"model {model.name!r} already has KeyLock (or AffineNorm) blocks; secure the original model")
    return model


def _select(model, where):
    candidates = lockable_layers(model)
    if not candidates:
        raise ValueError(f"model {model.name!r} has no conv or dense layer (other than its output) to lock")
    if where == "first":
        return [candidates[0]]
    if where == "all":
        return candidates
    if isinstance(where, (int, np.integer)) and not isinstance(where, bool):
        if not 1 <= where <= len(candidates):
            raise ValueError(f"where={where}: model {model.name!r} has {len(candidates)} lockable layers")
        return candidates[:where]
    if isinstance(where, str):
        raise ValueError(f"where must be 'first', 'all', a number of layers or a list of layer names, got {where!r}")
    by_name = {layer.name: layer for layer in candidates}
    unknown = [name for name in where if name not in by_name]
    if unknown or not where:
        raise ValueError(f"cannot lock {unknown or 'nothing'}: lockable layers are {sorted(by_name)}")
    return [by_name[name] for name in where]


def _per_lock(initializer, index):
    """A seeded initialiser re-seeded for the `index`-th lock (the first keeps it), so that several
    locks do not start from identical weights."""
    config = initializer.get_config() if index and initializer is not None else {}
    if config.get("seed") is None:
        return initializer
    config["seed"] += 100 * index  # KeyLock itself offsets the seed by 0..3 across a lock's weights
    return initializer.__class__.from_config(config)


def _clone(layer, **overrides):
    return layer.__class__.from_config({**layer.get_config(), **overrides})


def _consumers(model):
    """Maps a tensor id to the nodes of `model`'s graph that consume it."""
    consumers = {}
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            if not node.is_input:
                for tensor_id in node.flat_input_ids:
                    consumers.setdefault(tensor_id, []).append(node)
    return consumers


def node_call_arguments(node, tensors):
    """The (args, kwargs) that `node` of a functional Keras model calls its layer with, each Keras
    input tensor replaced by `tensors[tensor_id]` (ids as in `node.flat_input_ids`)."""
    if node._single_positional_tensor_passed:
        return (tensors[node.flat_input_ids[0]],), {}
    flat = list(node._flat_arguments)
    for tensor_id, index in node._keras_inputs_ids_and_indices:
        flat[index] = tensors[tensor_id]
    return tf.nest.pack_sequence_as((node.call_args, node.call_kwargs), flat)


def secure(
    model: tf.keras.Model,
    where: str | Sequence[str] = "first",
    key_dim: int = 1024,
    activation: str = "relu",
    normalization: str = "batch",
    key: np.ndarray | None = None,
    lock_initializer: tf.keras.initializers.Initializer | None = None,
    name: str | None = None,
    affine: str = "channel",
    kernel: str = "full",
    round_noise: float = 0.0,
) -> tf.keras.Model:
    """Returns a copy of `model` with a KeyLock block after each chosen conv/dense layer.

    A BatchNormalization that directly (and only) follows a chosen layer is replaced by the lock,
    as in the paper's block; a fused activation of the chosen layer moves after the lock. Every
    other layer is a fresh copy with the original's weights, so `model` itself is left untouched.

    Args:
      model: a built Sequential or functional Keras model.
      where: 'first', 'all' (every conv/dense layer but the outputs), a number n (the first n of
        them), or a list of layer names.
      key_dim, activation, normalization, lock_initializer, affine, kernel, round_noise: passed to each
        `tfkl.KeyLock`.
      key: the client key (shape (key_dim,)); default a fresh CSPRNG key, shared by all locks.
      name: name of the new model (default: the original's name + '_locked').
    """
    key = generate_key(key_dim) if key is None else validate_key(key, key_dim)
    locks = []

    def new_lock(name, **options):
        lock = KeyLock(
            key_dim,
            activation,
            normalization,
            lock_initializer=_per_lock(lock_initializer, len(locks)),
            key=key,
            affine=affine,
            kernel=kernel,
            round_noise=round_noise,
            name=f"{name}_keylock",
            **options,
        )
        locks.append(lock)
        return lock

    return _insert_blocks(model, where, new_lock, name or f"{model.name}_locked")


def add_affine_normalization(
    model: tf.keras.Model,
    where: str | Sequence[str] = "first",
    normalization: str = "batch",
    name: str | None = None,
) -> tf.keras.Model:
    """The FedAvg control of `secure`: a copy of `model` with a `tfkl.AffineNorm` block (the same
    normalisation with a learned affine, no key, no lock) wherever `secure` would put a KeyLock.

    Args as `secure`'s; name: default the original's name + '_norm'.
    """
    return _insert_blocks(
        model,
        where,
        lambda block_name, **options: AffineNorm(normalization, name=f"{block_name}_norm", **options),
        name or f"{model.name}_norm",
    )


def _insert_blocks(model, where, new_block, name):
    """A copy of `model` with `new_block(name, **options)` after each chosen conv/dense layer (see `secure`)."""
    model = _graph_model(model)
    targets = {id(layer) for layer in _select(model, where)}
    consumers = _consumers(model)

    def replaces_batch_norm(node):
        """True for a BatchNormalization node that directly and only follows a chosen layer."""
        if not isinstance(node.layer, tf.keras.layers.BatchNormalization) or len(node.parent_nodes) != 1:
            return False
        producer = node.parent_nodes[0].layer
        return (
            id(producer) in targets
            and len(consumers.get(node.flat_input_ids[0], [])) == 1
            and producer.get_config().get("activation", "linear") == "linear"
        )

    # Shape and dtype rather than `type_spec`: graph-mode Keras tensors (inside TFF computations) lack it.
    new_inputs = [
        tf.keras.Input(batch_size=t.shape[0], shape=t.shape[1:], dtype=t.dtype, name=t.name.split(":")[0])
        for t in model.inputs
    ]
    tensors = {str(id(old)): new for old, new in zip(model.inputs, new_inputs)}
    clones = {}

    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.layer
            if node.is_input:
                continue
            args, kwargs = node_call_arguments(node, tensors)
            if replaces_batch_norm(node):
                outputs = new_block(layer.name, momentum=layer.momentum, epsilon=layer.epsilon)(*args)
            elif id(layer) in targets:
                fused = layer.get_config().get("activation", "linear")
                if id(layer) not in clones:
                    clones[id(layer)] = _clone(layer, activation="linear") if fused != "linear" else _clone(layer)
                outputs = clones[id(layer)](*args, **kwargs)
                followers = consumers.get(node.flat_output_ids[0], [])
                if not (len(followers) == 1 and replaces_batch_norm(followers[0])):
                    outputs = new_block(layer.name)(outputs)
                    if fused != "linear":
                        outputs = tf.keras.layers.Activation(fused, name=f"{layer.name}_activation")(outputs)
            else:
                if id(layer) not in clones:
                    clones[id(layer)] = _clone(layer)
                outputs = clones[id(layer)](*args, **kwargs)
            for tensor_id, tensor in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
                tensors[tensor_id] = tensor

    new_outputs = tf.nest.pack_sequence_as(model._nested_outputs, [tensors[str(id(t))] for t in model.outputs])
    secured = tf.keras.Model(new_inputs, new_outputs, name=name)
    for layer in model.layers:
        if id(layer) in clones:
            clones[id(layer)].set_weights(layer.get_weights())
    return secured
