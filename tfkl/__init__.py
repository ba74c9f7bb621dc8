"""tfkl: FedKL key-lock defence for Keras and TensorFlow Federated."""

from tfkl import _keras  # first: makes tf.keras Keras 2 on TensorFlow >= 2.16

# isort: split
from tfkl import data, models, optimizers, training
from tfkl.keylock import KeyLock
from tfkl.keys import KeyFormatError, generate_key, load_key, save_key, validate_key
from tfkl.private import export_shared, get_key, load_shared, lock_layers, private_variables, set_key, shared_variables
from tfkl.secure import secure
from tfkl.version import __version__

__all__ = [
    "__version__",
    "KeyLock",
    "KeyFormatError",
    "generate_key",
    "load_key",
    "save_key",
    "validate_key",
    "export_shared",
    "get_key",
    "load_shared",
    "lock_layers",
    "private_variables",
    "set_key",
    "shared_variables",
    "secure",
]
