"""Federated FedKL and FedAvg on TensorFlow Federated, with private persistent client state."""

try:
    import tensorflow_federated
except ImportError as e:
    raise ImportError(
        "tfkl.federated needs the `federated` extra: TensorFlow Federated 0.87 on Python 3.9-3.11 with "
        "TensorFlow 2.14 (pip install -r requirements.txt && pip install --no-deps -r "
        f"requirements-tff.txt); {e}"
    ) from None

# isort: split
from tfkl.federated.algorithms import (
    CLIENT_WEIGHTINGS,
    STATISTICS,
    StatefulClientsProcess,
    build_fedavg_process,
    build_fedkl_process,
)
