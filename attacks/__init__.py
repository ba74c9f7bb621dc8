"""Gradient-inversion attacks on captured FedAvg/FedKL updates: DLG, iDLG, Inverting Gradients, GRNN, and a
generative-prior attack.

Every attack is built from the attacker's view (`AttackerModel(ServerView, threat)`) and one frozen config of
its hyperparameters (`DLGConfig`, `IGConfig`, `GRNNConfig`, `PriorConfig`); `reconstruct(target)` takes what a
curious server holds (the global weights in the view, one captured gradient or update as a `Target`) and
returns images, labels and a history. Simulated victims, and the true data only scoring reads, are in
`attacks.cases`.

`import attacks` does not load TensorFlow (the API below loads on first use), so that `attacks.names` serves
the binaries' flags before TensorFlow loads.
"""

import importlib

import tfkl  # noqa: F401  first: tf.keras is Keras 2 on every TensorFlow, see tfkl/_keras.py

_API = {
    "ADAPTIVE_STRATEGIES": "attacks.names",
    "THREATS": "attacks.names",
    "ATTACKS": "attacks.experiment",
    "AttackConfig": "attacks.base",
    "Reconstruction": "attacks.base",
    "Payload": "attacks.cases",
    "UserData": "attacks.cases",
    "client_gradient": "attacks.cases",
    "client_update_capture": "attacks.cases",
    "DLG": "attacks.dlg",
    "DLGConfig": "attacks.dlg",
    "IDLG": "attacks.dlg",
    "attack_captures": "attacks.experiment",
    "build_attack": "attacks.experiment",
    "run_attack": "attacks.experiment",
    "run_threats": "attacks.experiment",
    "GRNN": "attacks.grnn",
    "GRNNConfig": "attacks.grnn",
    "IGConfig": "attacks.ig",
    "InvertingGradients": "attacks.ig",
    "infer_labels": "attacks.labels",
    "AttackerModel": "attacks.model",
    "ServerView": "attacks.model",
    "extract_lock_weights": "attacks.model",
    "extract_secret": "attacks.model",
    "GenerativePrior": "attacks.prior",
    "PriorConfig": "attacks.prior",
    "train_decoder": "attacks.prior",
    "Target": "attacks.targets",
    "from_capture": "attacks.targets",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'attacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
