"""The captured-update file: what a curious server receives from one client in one round.

One `.npz` file per (round, client), the attack module's input:
  meta            JSON: format, round, client_id, model/data/lock configuration, the client's
                  number of examples and local steps, and the hyperparameters an attacker may
                  assume (batch size, local epochs, learning rate, momentum, Nesterov, weight
                  decay, loss). `variable_names` and `trainable` describe the arrays below.
  global/NNNNN    the global shared weights the server sent (`tfkl.shared_variables` order)
  update/NNNNN    the client's shared update: its shared weights after local training minus the
                  global ones (non-trainable statistics included)
Nothing private (key, lock weights, optimizer state) is ever written here.
"""

import collections
import json
import os

import numpy as np

from tfkl.files import atomic_write

FORMAT = "tfkl-capture/1"
REQUIRED_META = ("round", "client_id", "model", "input_shape", "num_classes", "lock", "num_examples",
                 "num_steps", "batch_size", "local_epochs", "learning_rate", "variable_names", "trainable")

Capture = collections.namedtuple("Capture", "meta global_weights update")


class CaptureFormatError(ValueError):
    """A capture file that is not readable as FORMAT."""


def capture_path(root_dir, round_num, client_id):
    return os.path.join(root_dir, "captures", f"round_{int(round_num):05d}_client_{client_id}.npz")


def save_capture(path, meta, global_weights, update):
    """Writes one capture atomically; `meta` must hold REQUIRED_META (except `format`)."""
    meta = dict(meta, format=FORMAT)
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CaptureFormatError(f"capture meta lacks {missing}")
    if not len(global_weights) == len(update) == len(meta["variable_names"]) == len(meta["trainable"]):
        raise CaptureFormatError("global weights, update, variable_names and trainable differ in length")
    arrays = {"meta": np.array(json.dumps(meta))}
    arrays.update({f"global/{i:05d}": np.asarray(w) for i, w in enumerate(global_weights)})
    arrays.update({f"update/{i:05d}": np.asarray(u) for i, u in enumerate(update)})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load_capture(path):
    """Reads a capture file; an unreadable or inconsistent one raises CaptureFormatError."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            count = len(meta["variable_names"])
            global_weights = [f[f"global/{i:05d}"] for i in range(count)]
            update = [f[f"update/{i:05d}"] for i in range(count)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CaptureFormatError(f"cannot read capture {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CaptureFormatError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return Capture(meta, global_weights, update)
