"""iDLG analytic label recovery from the last (logits) layer's gradient or update.

For mean cross-entropy on logits, the logits bias gradient is mean_i(softmax_i - onehot_i): at
batch 1 only the true class is negative (iDLG). Without a bias, the kernel's column sums carry the
same sign when the layer's inputs are non-negative (sigmoid/ReLU features). A FedAvg update moves
against the gradient, so its sign is flipped first (exact for one step, a first-order proxy for many).
"""

import numpy as np
import tensorflow as tf


def last_layer_signal(attacker, target):
    """The per-class signal (bias gradient, or kernel column sums) of the logits layer."""
    model = attacker.model
    producers = [
        layer
        for layer in model.layers
        if any(out is model.outputs[0] for node in layer.inbound_nodes for out in tf.nest.flatten(node.outputs))
    ]
    layer = producers[0] if producers else model.layers[-1]
    if not isinstance(layer, tf.keras.layers.Dense):
        raise ValueError(f"label recovery needs a Dense logits layer, got {type(layer).__name__}")
    trainable_position = np.cumsum(attacker.trainable) - 1
    if layer.use_bias:
        signal = np.asarray(target.values[trainable_position[attacker._index[id(layer.bias)]]])
    else:
        signal = np.asarray(target.values[trainable_position[attacker._index[id(layer.kernel)]]]).sum(axis=0)
    if target.kind == "update":  # in gradient units: minus the update per learning rate and step
        return -signal / (target.learning_rate * target.num_steps)
    return signal


def infer_labels(attacker, target):
    """Labels of the target's examples: batch 1 by the iDLG rule; batches by counting.

    For N examples: classes with a negative signal are present; their counts are estimated as
    N * (p - s_c), with p the mean signal of the absent classes (the average softmax mass an
    untrained model puts on a class), and allocated greedily so that they add up to N."""
    return _counting_rule(last_layer_signal(attacker, target), target.num_examples)


def _count_estimates(signal, n):
    """N * (p - s_c) for every class c (see `infer_labels`)."""
    absent = signal[signal >= 0]
    return n * ((float(absent.mean()) if len(absent) else 0.0) - signal)


def _counting_rule(signal, n):
    if n == 1:
        return np.array([int(np.argmin(signal))])
    present = np.flatnonzero(signal < 0)
    if len(present) == 0:
        present = np.array([int(np.argmin(signal))])
    estimates = _count_estimates(signal, n)
    estimate = {int(c): estimates[c] for c in present}
    counts = {c: 1 for c in sorted(estimate, key=lambda c: signal[c])[:n]}
    while sum(counts.values()) < n:
        c = max(estimate, key=lambda c: estimate[c] - counts.get(c, 0))
        counts[c] = counts.get(c, 0) + 1
    return np.array(sorted(c for c, k in counts.items() for _ in range(k)))


def label_hypotheses(attacker, target, count):
    """Up to `count` label multisets of a batch, most plausible first: `infer_labels`' counts, then the
    count vectors one example away from them (one example moved to another class), ranked by their squared
    distance to the per-class estimates N * (p - s_c). An attack tries them as restarts and keeps the one
    its loss prefers: one wrong label is enough to make a batch reconstruction fail."""
    signal, n = last_layer_signal(attacker, target), target.num_examples
    first = _counting_rule(signal, n)
    if n == 1 or count <= 1:
        return [first]
    estimate = _count_estimates(signal, n)
    counts = np.bincount(first, minlength=len(signal))
    neighbours = []
    for source in np.flatnonzero(counts):
        for destination in range(len(signal)):
            if destination != source:
                moved = counts.copy()
                moved[source] -= 1
                moved[destination] += 1
                neighbours.append((float(np.sum((moved - estimate) ** 2)), source, destination, moved))
    neighbours.sort(key=lambda item: item[:3])
    return [first] + [np.repeat(np.arange(len(signal)), moved) for *_, moved in neighbours[: count - 1]]
