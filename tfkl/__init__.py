"""tfkl: FedKL key-lock defence for Keras and TensorFlow Federated.

`import tfkl` does not load TensorFlow: the API below loads on first use (after tfkl._keras has made tf.keras
Keras 2), so that `tfkl.names` serves the binaries' flags before TensorFlow loads.
"""

import importlib
import os
import sys

from tfkl.version import __version__

# Before TensorFlow loads: tf.keras is then Keras 2 (tf_keras) on TensorFlow >= 2.16, see tfkl/_keras.py.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
if "tensorflow" in sys.modules or os.environ["TF_USE_LEGACY_KERAS"] not in ("1", "true", "True"):
    from tfkl import _keras  # Keras 3 may be loaded already or chosen: refuse it now, in one line

_API = {
    "AffineNorm": "tfkl.keylock",
    "KeyLock": "tfkl.keylock",
    "KeyFormatError": "tfkl.keys",
    "generate_key": "tfkl.keys",
    "load_key": "tfkl.keys",
    "save_key": "tfkl.keys",
    "validate_key": "tfkl.keys",
    "export_shared": "tfkl.private",
    "get_key": "tfkl.private",
    "load_shared": "tfkl.private",
    "lock_layers": "tfkl.private",
    "private_variables": "tfkl.private",
    "set_key": "tfkl.private",
    "shared_variables": "tfkl.private",
    "add_affine_normalization": "tfkl.securing",
    "secure": "tfkl.securing",
}
_SUBMODULES = ("data", "models", "optimizers", "training")

__all__ = ["__version__", *_API]


def __getattr__(name):
    if name not in _API and name not in _SUBMODULES:
        raise AttributeError(f"module 'tfkl' has no attribute {name!r}")
    importlib.import_module("tfkl._keras")
    if name in _SUBMODULES:
        value = importlib.import_module(f"tfkl.{name}")
    else:
        value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
