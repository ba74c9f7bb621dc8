"""Gradient-inversion attacks on captured FedAvg/FedKL updates: DLG, iDLG, Inverting Gradients, GRNN, and a
generative-prior attack.

Every attack is built from the attacker's view (`AttackerModel(ServerView, threat)`) and its
hyperparameters; `reconstruct(target)` takes what a curious server holds (the global weights in the
view, one captured gradient or update as a `Target`) and returns images, labels and a history.
Simulated victims, and the true data only scoring reads, are in `attacks.cases`.
"""

import tfkl  # first: tf.keras is Keras 2 on every TensorFlow, see tfkl/_keras.py

# isort: split
from attacks.base import Reconstruction
from attacks.cases import Payload, UserData, client_gradient, client_update_capture
from attacks.dlg import DLG, IDLG
from attacks.experiment import ATTACKS, attack_captures, build_attack, run_attack, run_threats
from attacks.grnn import GRNN
from attacks.ig import InvertingGradients
from attacks.labels import infer_labels
from attacks.model import THREATS, AttackerModel, ServerView, extract_lock_weights, extract_secret
from attacks.prior import GenerativePrior, train_decoder
from attacks.targets import Target, from_capture

__all__ = [
    "ATTACKS",
    "THREATS",
    "AttackerModel",
    "DLG",
    "GRNN",
    "GenerativePrior",
    "IDLG",
    "InvertingGradients",
    "Payload",
    "Reconstruction",
    "ServerView",
    "Target",
    "UserData",
    "attack_captures",
    "build_attack",
    "client_gradient",
    "client_update_capture",
    "extract_lock_weights",
    "extract_secret",
    "from_capture",
    "infer_labels",
    "run_attack",
    "run_threats",
    "train_decoder",
]
