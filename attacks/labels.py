"""Label recovery from the last (logits) layer's gradient or update.

For mean cross-entropy on logits, the logits bias gradient is mean_i(softmax_i - onehot_i): at
batch 1 only the true class is negative (iDLG). Without a bias, the kernel's column sums carry the
same sign when the layer's inputs are non-negative (sigmoid/ReLU features). A FedAvg update moves
against the gradient, so its sign is flipped first (exact for one step, a first-order proxy for many).

A multi-step update mixes its steps' labels with unequal weights (momentum) while the model learns
them (the softmax mass moves to the classes seen), so counting fails there; `step_assignments`
instead searches which labels each local step saw by replaying the client's steps.
"""

import numpy as np
import tensorflow as tf

from attacks import targets as targets_lib


def last_layer_signal(attacker, target):
    """The per-class signal (bias gradient, or kernel column sums) of the logits layer."""
    signal = np.asarray(_logits_signal(attacker)(target.values))
    if target.kind == "update":  # in gradient units: minus the update per learning rate and step
        return -signal / (target.learning_rate * target.num_steps)
    return signal


def _logits_signal(attacker):
    """values -> the logits layer's per-class signal in them (its bias, or its kernel's column sums)."""
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
        position = trainable_position[attacker._index[id(layer.bias)]]
        return lambda values: values[position]
    position = trainable_position[attacker._index[id(layer.kernel)]]
    return lambda values: tf.reduce_sum(values[position], axis=0)


def infer_labels(attacker, target):
    """Labels of the target's examples: batch 1 by the iDLG rule; batches by counting; multi-step
    updates, in the order the client trained, by `step_assignments`.

    For N examples: classes with a negative signal are present; their counts are estimated as
    N * (p - s_c), with p the mean signal of the absent classes (the average softmax mass an
    untrained model puts on a class), and allocated greedily so that they add up to N."""
    if _has_steps(target):
        return step_assignments(attacker, target, 1)[0]
    return count_labels(attacker, target)


def count_labels(attacker, target):
    """The counting rule's labels (sorted) from the logits layer's signal alone (see `infer_labels`)."""
    return _counting_rule(last_layer_signal(attacker, target), target.num_examples)


def _has_steps(target):
    return target.kind == "update" and target.num_steps > 1 and target.num_examples > 1


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


def member_hypotheses(attacker, pooled, count, members=None):
    """`label_hypotheses` of each of a pool's first `members` members (default: all), each on its own round's
    global weights (`targets.Pooled.weights`)."""
    per_member = []
    for member, weights in list(zip(pooled.members, pooled.weights))[:members]:
        with attacker.bound(([tf.constant(w, tf.float32) for w in weights], attacker.lock_weights)):
            per_member.append(label_hypotheses(attacker, member, count))
    return per_member


def label_hypotheses(attacker, target, count):
    """Up to `count` label multisets of a batch, most plausible first: `infer_labels`' counts, then the
    count vectors one example away from them (one example moved to another class), ranked by their squared
    distance to the per-class estimates N * (p - s_c). An attack tries them as restarts and keeps the one
    its loss prefers: one wrong label is enough to make a batch reconstruction fail. Multi-step updates:
    `step_assignments`."""
    if _has_steps(target):
        return step_assignments(attacker, target, count)
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


def step_assignments(attacker, target, count, starts_per_round=16, max_starts=128, seed=0):
    """Up to `count` label sequences of a multi-step update (example i in step i // batch_size), best first.

    Each candidate is scored by replaying the client's local steps on blank images (`targets.simulate`)
    and comparing the replayed logits-layer signal with the update's: what the labels do to that layer
    barely depends on the images (the softmax of an untrained model hardly does), while it records when
    each class was seen (momentum weights the steps unequally, and later steps' softmax has learnt the
    earlier classes). Steepest descent over single-label changes, swaps across steps and two classes
    trading places runs from rounds of `starts_per_round` starts (first the counting rule's labels, then
    seeded draws from the classes its signal says are present) until the best score is within what the
    unknown images could explain (twice the mismatch between its labels' replays on blank and on
    uniform-noise images) or `max_starts` have run; the distinct assignments scored are returned by
    score. Blank images and the adaptive attacker's start lock stand in for what the attacker does not
    know; no truth is read."""
    n, batch_size = target.num_examples, target.batch_size
    logits_signal = _logits_signal(attacker)
    observed = tf.constant(logits_signal(target.values), tf.float32)
    blank = tf.zeros((n,) + attacker.input_shape, tf.float32)
    latent = tf.constant(attacker.initial_lock_latent(1, seed)[0], tf.float32)

    @tf.function(reduce_retracing=True)
    def replay(images, labels):
        return logits_signal(targets_lib.simulate(attacker, target, images, labels, latent)) / target.learning_rate

    kept = tf.cast(observed != 0, tf.float32) if target.pruned else tf.ones_like(observed)  # as the attacks do
    reference = observed / target.learning_rate

    def distance(replayed, reference):
        return tf.reduce_sum(kept * tf.square(replayed - reference))

    def mismatch(labels, images, reference):
        return float(distance(replay(images, labels), reference))

    @tf.function(reduce_retracing=True)
    def blank_mismatches(candidates):  # [K, n] labels -> [K]: one call scores a descent step's moves
        one = lambda labels: distance(replay(blank, labels), reference)  # noqa: E731
        return tf.map_fn(one, candidates, fn_output_signature=tf.float32, parallel_iterations=16)

    scores = {}

    def score(candidates):
        """The scores of label sequences, each step's labels as a multiset (their order within a step does not
        matter); those not scored yet in one call."""
        keys = [step_multisets(c, batch_size) for c in candidates]
        new = {k: c for k, c in zip(keys, candidates) if k not in scores}
        if new:
            values = blank_mismatches(tf.constant(np.stack(list(new.values())), tf.int64)).numpy()
            scores.update(zip(new, (float(v) for v in values)))
        return [scores[k] for k in keys]

    signal = last_layer_signal(attacker, target)
    present = np.flatnonzero(signal < 0) if np.any(signal < 0) else np.arange(attacker.num_classes)
    rng = np.random.default_rng(seed)
    noise = [tf.random.stateless_uniform(blank.shape, (seed, draw)) for draw in range(2)]
    starts = [_counting_rule(signal, n)] + [rng.choice(present, n) for _ in range(starts_per_round - 1)]
    tried = 0
    while starts:
        for start in starts:
            _descend(start, score, batch_size, attacker.num_classes)
        tried += len(starts)
        best = min(scores, key=scores.get)
        labels = tf.constant(np.concatenate(best), tf.int64)
        if scores[best] <= 2 * max(mismatch(labels, images, replay(blank, labels)) for images in noise):
            break
        starts = [rng.choice(present, n) for _ in range(min(starts_per_round, max_starts - tried))]
    return [np.concatenate(key).astype(np.int64) for key in sorted(scores, key=scores.get)[:count]]


def step_multisets(labels, batch_size):
    """Each local step's labels, sorted (the order within a step is not identifiable): a tuple per step."""
    return tuple(tuple(sorted(int(c) for c in labels[s : s + batch_size])) for s in range(0, len(labels), batch_size))


def _descend(labels, score, batch_size, classes):
    """Steepest descent from `labels` of `score` (label sequences -> their scores; see `step_assignments`);
    returns the score reached."""
    current, (current_score,) = labels.copy(), score([labels])
    while True:
        moves = []
        for i in range(len(current)):
            moves += [_with(current, {i: c}) for c in range(classes) if c != current[i]]
            moves += [
                _with(current, {i: current[j], j: current[i]})
                for j in range(i + 1, len(current))
                if i // batch_size != j // batch_size and current[i] != current[j]
            ]
        for a in np.unique(current):  # two classes trade places everywhere
            moves += [
                np.where(current == a, b, np.where(current == b, a, current))
                for b in range(classes)
                if b != a and not (b in current and b < a)
            ]
        values = score(moves)
        best = int(np.argmin(values))  # the first of the lowest, as min() takes it
        if values[best] >= current_score:
            return current_score
        current, current_score = moves[best], values[best]


def _with(labels, changes):
    changed = labels.copy()
    for i, c in changes.items():
        changed[i] = c
    return changed
