"""The pinned stack imports together (TFF 0.87 is installed without its resolver)."""

import importlib

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "tensorflow",
        "tensorflow_federated",
        "tensorflow_datasets",
        "tensorflow_probability",
        "tensorflow_privacy",
        "sklearn",
        "vizier",
    ],
)
def test_imports(module):
    importlib.import_module(module)


def test_versions():
    import keras
    import tensorflow as tf
    import tensorflow_federated as tff

    assert tf.__version__ == "2.14.1" and keras.__version__.startswith("2.14")
    assert tff.__version__ == "0.87.0"
