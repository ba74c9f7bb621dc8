"""The captured update: THE payload between a federated server and an attacker.

One `.npz` file per (round, client), what a curious server receives from that client in that round:
  meta            JSON built by `build_meta`: format, round, client_id; the shared model's
                  `architecture` (its Keras config, which holds no key and no lock weight) and, read
                  from it, `input_shape`, `num_classes` and `lock`; the client's number of examples
                  and local steps; the hyperparameters an attacker may assume (batch size, local
                  epochs, learning rate, momentum, Nesterov, weight decay, loss). `variable_names`
                  and `trainable` describe the arrays below. A federated run adds its facts and a
                  `ground_truth` section, for scoring an attack only (attacks never read it).
  global/NNNNN    the global shared weights the server sent (`tfkl.shared_variables` order)
  update/NNNNN    the client's shared update: its shared weights after local training minus the
                  global ones (non-trainable statistics included)
Nothing private (key, lock weights, optimizer state) is ever written here.

`SharedLayout`, `run_meta_fn`, `captures_round` and `save_round_captures` write a federated run's captures.
"""

import collections
import json
import os
import zipfile

import numpy as np
import tensorflow as tf

from tfkl import private
from tfkl.files import atomic_write

FORMAT = "tfkl-capture/2"
LOSS = "sparse_categorical_crossentropy_from_logits_mean"
REQUIRED_META = (
    "format",
    "round",
    "client_id",
    "architecture",
    "input_shape",
    "num_classes",
    "lock",
    "num_examples",
    "num_steps",
    "batch_size",
    "local_epochs",
    "learning_rate",
    "momentum",
    "nesterov",
    "weight_decay",
    "loss",
    "variable_names",
    "trainable",
)

Capture = collections.namedtuple("Capture", "meta global_weights update")


class CaptureFormatError(ValueError):
    """A capture file that is not readable as FORMAT, or whose meta does not fit its weights."""


def build_meta(
    model,
    *,
    round_num,
    client_id,
    num_examples,
    num_steps,
    batch_size,
    local_epochs,
    learning_rate,
    momentum,
    nesterov,
    weight_decay,
    **details,
):
    """The meta of one client's capture; `model` is the shared model (any client's: its config and
    shared variables are the same), `details` further JSON fields (run facts, `ground_truth`)."""
    shared = private.shared_variables(model)
    return dict(
        details,
        format=FORMAT,
        round=int(round_num),
        client_id=str(client_id),
        architecture=json.loads(model.to_json()),
        input_shape=list(model.input_shape[1:]),
        num_classes=int(model.output_shape[-1]),
        lock=bool(private.lock_layers(model)),
        num_examples=int(num_examples),
        num_steps=int(num_steps),
        batch_size=int(batch_size),
        local_epochs=int(local_epochs),
        learning_rate=float(learning_rate),
        momentum=float(momentum),
        nesterov=bool(nesterov),
        weight_decay=float(weight_decay),
        loss=LOSS,
        variable_names=[v.name for v in shared],
        trainable=[bool(v.trainable) for v in shared],
    )


def _check_meta(meta, source):
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CaptureFormatError(f"{source}: format {found!r}, expected {FORMAT!r}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CaptureFormatError(f"{source}: the meta lacks {missing}")
    if len(meta["variable_names"]) != len(meta["trainable"]):
        raise CaptureFormatError(f"{source}: variable_names and trainable differ in length")


def capture_path(root_dir, round_num, client_id):
    return os.path.join(root_dir, "captures", f"round_{int(round_num):05d}_client_{client_id}.npz")


def save_capture(path, meta, global_weights, update):
    """Writes one capture atomically; `meta` comes from `build_meta`."""
    _check_meta(meta, path)
    if not len(global_weights) == len(update) == len(meta["variable_names"]):
        raise CaptureFormatError(f"{path}: global weights, update and variable_names differ in length")
    arrays = {"meta": np.array(json.dumps(meta))}
    arrays.update({f"global/{i:05d}": np.asarray(w) for i, w in enumerate(global_weights)})
    arrays.update({f"update/{i:05d}": np.asarray(u) for i, u in enumerate(update)})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load_capture(path):
    """Reads a capture file; an unreadable, old or foreign one raises CaptureFormatError."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            arrays = {name: f[name] for name in f.files if name != "meta"}
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        reason = "the file is empty" if isinstance(e, EOFError) else f"{type(e).__name__}: {e}"
        raise CaptureFormatError(f"cannot read capture {path} ({reason})") from None
    _check_meta(meta, path)
    count = len(meta["variable_names"])
    names = [f"{part}/{i:05d}" for part in ("global", "update") for i in range(count)]
    if sorted(arrays) != sorted(names):
        raise CaptureFormatError(f"{path}: holds {len(arrays)} arrays, the meta names {count} variables")
    for name in names:
        if arrays[name].dtype != np.float32:
            raise CaptureFormatError(f"{path}: array {name} is {arrays[name].dtype}, a capture's arrays are float32")
        if not np.isfinite(arrays[name]).all():
            raise CaptureFormatError(f"{path}: array {name} holds NaN or infinite values")
    global_weights, update = [arrays[n] for n in names[:count]], [arrays[n] for n in names[count:]]
    if any(np.shape(g) != np.shape(u) for g, u in zip(global_weights, update)):
        raise CaptureFormatError(f"{path}: the update's shapes differ from the global weights'")
    return Capture(meta, global_weights, update)


def shared_model(capture):
    """The model rebuilt from the capture's `architecture` (private variables as initialised, never
    read); raises CaptureFormatError unless it fits the meta and the captured weights."""
    meta = capture.meta
    try:
        model = tf.keras.models.model_from_json(json.dumps(meta["architecture"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CaptureFormatError(f"the capture's architecture is not a Keras model config: {e}") from None
    found = dict(
        input_shape=list(model.input_shape[1:]),
        num_classes=int(model.output_shape[-1]),
        lock=bool(private.lock_layers(model)),
        weight_shapes=[tuple(v.shape) for v in private.shared_variables(model)],
    )
    stated = dict(
        input_shape=list(meta["input_shape"]),
        num_classes=int(meta["num_classes"]),
        lock=bool(meta["lock"]),
        weight_shapes=[tuple(np.shape(w)) for w in capture.global_weights],
    )
    differing = [k for k in found if found[k] != stated[k]]
    if differing:
        k = differing[0]
        if k == "weight_shapes":  # the first differing shape, not hundreds of them
            index = next(i for i, (a, b) in enumerate(zip(found[k] + [None], stated[k] + [None])) if a != b)
            k = f"shared variable {index}'s shape"
            found[k], stated[k] = (found["weight_shapes"] + [None])[index], (stated["weight_shapes"] + [None])[index]
        raise CaptureFormatError(
            f"the capture's architecture does not fit its meta and weights ({k}: "
            f"{found[k]} in the architecture, {stated[k]} in the capture)"
        )
    return model


class SharedLayout:
    """Maps a process's (trainable, non_trainable) shared lists to the capture's order
    (`tfkl.shared_variables` of `model`, the run's shared model)."""

    def __init__(self, model, parts):
        trainable_pos = {id(model.trainable_variables[i]): ("t", k) for k, i in enumerate(parts.trainable)}
        non_trainable_pos = {id(model.non_trainable_variables[i]): ("n", k) for k, i in enumerate(parts.non_trainable)}
        positions = {**trainable_pos, **non_trainable_pos}
        self.model = model
        self.order = [positions[id(v)] for v in private.shared_variables(model)]

    def flatten(self, trainable, non_trainable):
        lists = {"t": list(trainable), "n": list(non_trainable)}
        return [np.asarray(lists[kind][k]) for kind, k in self.order]


def captures_round(capture_rounds, round_num):
    """Whether a run with `capture_rounds` (round numbers, or "all") captures `round_num`."""
    return "all" in capture_rounds or round_num in capture_rounds


def run_meta_fn(config, dataset_name, learning_rate, data_seeds, examples):
    """client id -> the `build_meta` fields a federated run gives one client's capture in one round:
    the client's data size (`examples[client_id]`: the indices it trained on), the hyperparameters, the
    run's facts and a separate ground-truth section."""

    def meta(client_id):
        return dict(
            num_examples=int(len(examples[client_id])),
            batch_size=config.batch_size,
            local_epochs=config.local_epochs,
            learning_rate=float(learning_rate),
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
            algorithm=config.algorithm,
            lock_init=config.lock_init,
            init=config.init,
            optimizer_state="persistent" if config.persist_optimizer_state else "fresh",
            statistics=config.statistics,
            client_weighting=config.client_weighting,
            ground_truth=dict(
                note="for scoring an attack only; not attacker knowledge",
                dataset=dataset_name,
                data_dir=config.data_dir,
                split=config.split,
                alpha=config.alpha,
                split_seed=config.seed,
                num_clients=config.num_clients,
                client_index=int(client_id),
                examples_per_client=config.examples_per_client,
                fresh_examples=config.fresh_examples,
                shuffle_seed=data_seeds[client_id],
                input_pipeline="tfkl.federated.client_data.client_dataset",
            ),
        )

    return meta


def save_round_captures(root_dir, round_num, layout, global_trainable, global_non_trainable, reports, meta_fn):
    """Writes what a curious server received from each accepted client this round; returns the paths.

    `reports`: the round's per-client reports (the update, `num_steps`, `num_examples` processed);
    `meta_fn(client_id)`: see `run_meta_fn`.
    """
    global_weights = layout.flatten(global_trainable, global_non_trainable)
    paths = []
    for client_id, report in reports.items():
        if not report["accepted"]:
            continue
        update = report["update"]
        non_trainable = update["non_trainable"] or [np.zeros_like(w) for w in global_non_trainable]
        meta = build_meta(
            layout.model,
            round_num=round_num,
            client_id=client_id,
            num_steps=report["num_steps"],
            examples_processed=int(report["num_examples"]),
            **meta_fn(client_id),
        )
        path = capture_path(root_dir, round_num, client_id)
        save_capture(path, meta, global_weights, layout.flatten(update["trainable"], non_trainable))
        paths.append(path)
    return paths
