"""Lock recovery: an attacker holding the global model re-learns the lock layers from public examples.

Entry (e) of the evaluation matrix (`tfkl.federated.evaluation.evaluate(..., lock_recovery=recover)`):
starting from a fresh lock under a random key, or from zero kernels (`affine_start`), the attacker
fine-tunes the lock on N public labelled examples (`recover_lock`), once on the server's moving
statistics and once re-estimating them on those examples; its accuracy is the best of the four.
"""

import numpy as np
import tensorflow as tf

from tfkl.federated.evaluation import cycled_batches
from tfkl.training import classification_loss

RECOVERY_STATISTICS = ("server", "public")


def affine_start(lock_vars):
    """Lock weights that make every lock a plain affine whatever the key: zero kernels, so gamma and beta
    are act(bias); scale biases 1 and shift biases 0.1 (positive: ReLU passes their gradient). Fitting
    the biases alone then fits the 2 x channels numbers (gamma, beta) of each lock directly."""
    values = []
    for index, variable in enumerate(lock_vars):
        fill = {0: 0.0, 1: 1.0, 2: 0.0, 3: 0.1}[index % 4]  # (scale kernel, scale bias, shift kernel, shift bias)
        values.append(np.full(variable.shape, fill, np.float32))
    return values


def recover_lock(
    evaluator, images, labels, input_shape, steps, seed, statistics, learning_rate=0.01, batch_size=32, variables=None
):
    """Fine-tunes the lock layers of `evaluator`'s model (a `tfkl.federated.evaluation.Evaluator`), or
    `variables` (some of them), on a small labelled set. With statistics='server' the model runs in
    inference mode on the server's moving statistics; with 'public' it trains in train mode, so the
    moving statistics follow the public batches (they matter when clients keep theirs local)."""
    model = evaluator.model
    variables = evaluator.lock_vars if variables is None else variables
    optimizer = tf.keras.optimizers.Adam(learning_rate)
    loss_fn = classification_loss()
    training = statistics == "public"

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=training))
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables))
        return loss

    for x, y in cycled_batches(images, labels, input_shape, batch_size, seed).take(steps):
        step(x, y)


def recover(evaluator, images, labels, eval_ds, *, steps, seed, random_key, fresh_lock, report):
    """Entry (e) on the public (`images`, `labels`): {accuracy (the best), by_statistics (from
    `fresh_lock`), affine_by_statistics (from `affine_start`)}, each accuracy on `eval_ds` after
    `steps` of `recover_lock` from that start under `random_key`. `report` prints progress."""
    shape = tuple(evaluator.config.input_shape)
    biases = [v for index, v in enumerate(evaluator.lock_vars) if index % 2]
    by_start = {"fresh_lock": {}, "affine": {}}
    for start, lock, variables in (
        ("fresh_lock", fresh_lock, None),
        ("affine", affine_start(evaluator.lock_vars), biases),
    ):
        for statistics in RECOVERY_STATISTICS:
            report(f"(e) lock recovery on {len(labels)} public examples, from {start}, {statistics} statistics")
            evaluator.set_statistics(evaluator.global_statistics)
            evaluator.set_secret(random_key, lock)
            recover_lock(evaluator, images, labels, shape, steps, seed, statistics, variables=variables)
            by_start[start][statistics] = evaluator.accuracy(eval_ds)
    return dict(
        accuracy=max(max(values.values()) for values in by_start.values()),
        by_statistics=by_start["fresh_lock"],
        affine_by_statistics=by_start["affine"],
    )
