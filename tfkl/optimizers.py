"""The paper's client optimizer, computed as torch.optim.SGD does, in pure TensorFlow.

`TorchSGD` follows the protocol of `tff.learning.optimizers.Optimizer` (`initialize(specs)` and
`next(state, weights, gradients)` on structures of tensors), so the same code updates weights in
central Keras training and inside TFF client work, and its state (the momentum buffers) can be kept
by a client across rounds.
"""

import tensorflow as tf

LEARNING_RATE = "learning_rate"
MOMENTUM_BUFFERS = "momentum_buffers"


class TorchSGD:
    """SGD with coupled weight decay, momentum and optional Nesterov, as in PyTorch.

    g = grad + weight_decay * w;  buf = momentum * buf + g;
    step = g + momentum * buf (Nesterov) or buf;  w = w - learning_rate * step.
    (PyTorch starts with buf = g, which equals momentum * 0 + g.)
    """

    def __init__(self, learning_rate=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4):
        if learning_rate <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("learning_rate must be positive; momentum and weight_decay non-negative")
        if nesterov and momentum == 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)

    def initialize(self, specs):
        buffers = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), specs)
        return {LEARNING_RATE: tf.constant(self.learning_rate, tf.float32), MOMENTUM_BUFFERS: buffers}

    def next(self, state, weights, gradients):
        learning_rate = state[LEARNING_RATE]

        def update(w, g, buf):
            if g is None:
                return w, buf
            g = g + self.weight_decay * w
            buf = self.momentum * buf + g
            step = g + self.momentum * buf if self.nesterov else buf
            return w - tf.cast(learning_rate, w.dtype) * step, buf

        flat = [
            update(w, g, b)
            for w, g, b in zip(
                tf.nest.flatten(weights), tf.nest.flatten(gradients), tf.nest.flatten(state[MOMENTUM_BUFFERS])
            )
        ]
        new_weights = tf.nest.pack_sequence_as(weights, [w for w, _ in flat])
        buffers = tf.nest.pack_sequence_as(state[MOMENTUM_BUFFERS], [b for _, b in flat])
        return {LEARNING_RATE: learning_rate, MOMENTUM_BUFFERS: buffers}, new_weights


def multistep_learning_rate(base, milestones, gamma, step):
    """PyTorch MultiStepLR: `base * gamma ** (number of milestones <= step)`."""
    return base * gamma ** sum(1 for m in milestones if m <= step)
