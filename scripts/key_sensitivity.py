"""How much the victim's shared gradient depends on the secret, per layer (README, "Attacks").

  PYTHONPATH=. python scripts/key_sensitivity.py

Untrained locked LeNet (PyTorch init, seed 0, key seed 1, as experiments.studies.attack_quality), Fashion-MNIST
training image 0, batch 1: the relative L2 difference between the victim's gradient and the gradient of
the same image under (1) the victim's lock weights with a random key, (2) random lock weights and key.
"""

import numpy as np
import tensorflow as tf

from attacks import cases, study, targets
from attacks import model as model_lib


def relative_errors(attacker, target, image, label, latent):
    """Per shared variable, then over all of them: |predicted - victim| / |victim|."""
    predicted = [p.numpy() for p in targets.simulate(attacker, target, tf.constant(image), tf.constant(label), latent)]
    per_variable = [float(np.linalg.norm(p - t) / np.linalg.norm(t)) for p, t in zip(predicted, target.values)]
    overall = np.sqrt(
        sum(np.sum((p - t) ** 2) for p, t in zip(predicted, target.values)) / sum(np.sum(t**2) for t in target.values)
    )
    return per_variable + [float(overall)]


def main():
    _, shape, images, labels = study.load_images("fashion_mnist", "lenet", 1)
    victim = cases.build_victims("lenet", shape, 10, threats=["oracle"])["locked"]
    target = cases.client_gradient(victim, images, labels)
    view = model_lib.ServerView.from_model(victim)
    known_lock = model_lib.AttackerModel(view, "adaptive-key", secret=model_lib.extract_lock_weights(victim))
    fixed_key = model_lib.AttackerModel(view, "fixed-key", seed=7)
    names = [n for n, trainable in zip(view.names, view.trainable) if trainable] + ["all"]
    rows = zip(
        names,
        relative_errors(known_lock, target, images, labels, known_lock.initial_lock_latent(1, 0)[0]),
        relative_errors(fixed_key, target, images, labels, tf.zeros([0])),
    )
    print(f"{'shared variable':<20}{'known lock, random key':>24}{'random lock and key':>22}")
    for name, known, fixed in rows:
        print(f"{name:<20}{known:>24.4f}{fixed:>22.4f}")


if __name__ == "__main__":
    main()
