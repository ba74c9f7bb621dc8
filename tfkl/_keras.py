"""Keras 2 for tfkl on every TensorFlow: imported by tfkl/__init__.py before any module touches tf.keras.

TensorFlow 2.14 (the federated stack) ships Keras 2 as tf.keras. From TensorFlow 2.16 tf.keras is Keras 3,
unless TF_USE_LEGACY_KERAS=1 is set before tf.keras is first used: it is then the `tf_keras` package (Keras 2).
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402  (after the variable above)

try:
    _KERAS_MAJOR = int(getattr(tf.keras, "__version__", "2").split(".")[0])  # Keras 2's tf.keras has no __version__
except ImportError as e:
    raise ImportError(f"tfkl needs Keras 2: on TensorFlow {tf.__version__} run `pip install tf_keras` ({e})") from None
if _KERAS_MAJOR >= 3:
    raise ImportError(
        f"tfkl needs Keras 2 but tf.keras is Keras {tf.keras.__version__}: install tf_keras and set "
        "TF_USE_LEGACY_KERAS=1 before TensorFlow is imported (or import tfkl first)"
    )
