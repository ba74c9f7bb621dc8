"""Central (non-federated) training and evaluation with the paper's optimizer."""

import numpy as np
import tensorflow as tf

from tfkl.optimizers import LEARNING_RATE, MOMENTUM_BUFFERS, TorchSGD


def classification_loss():
    """The clients' loss: mean softmax cross-entropy on logits (attacks must reuse it exactly)."""
    return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class Trainer:
    """Trains a Keras model with a `TorchSGD`-protocol optimizer, keeping its state in variables."""

    def __init__(self, model, optimizer=None, loss=None):
        self.model = model
        self.optimizer = optimizer or TorchSGD()
        self.loss = loss or classification_loss()
        variables = model.trainable_variables
        state = self.optimizer.initialize([tf.TensorSpec(v.shape, v.dtype) for v in variables])
        self.learning_rate = tf.Variable(state[LEARNING_RATE], trainable=False, name="learning_rate")
        self.buffers = [tf.Variable(b, trainable=False) for b in state[MOMENTUM_BUFFERS]]

    @tf.function
    def train_step(self, images, labels):
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss = self.loss(labels, self.model(images, training=True))
        gradients = tape.gradient(loss, variables)
        state = {LEARNING_RATE: self.learning_rate, MOMENTUM_BUFFERS: [b.read_value() for b in self.buffers]}
        state, new_weights = self.optimizer.next(state, [v.read_value() for v in variables], gradients)
        for variable, value in zip(variables, new_weights):
            variable.assign(value)
        for buffer, value in zip(self.buffers, state[MOMENTUM_BUFFERS]):
            buffer.assign(value)
        return loss

    def fit_epoch(self, dataset, progress=None):
        """One pass over `dataset`; returns the mean training loss."""
        losses = []
        for step, (images, labels) in enumerate(dataset, start=1):
            losses.append(float(self.train_step(images, labels)))
            if progress is not None:
                progress.update(step, [("loss", losses[-1])])
        if not losses:
            raise ValueError("the training data set is empty")
        return float(np.mean(losses))


def accuracy(model, dataset):
    """Exact top-1 accuracy of `model` (inference mode) over `dataset`."""
    correct = total = 0
    for images, labels in dataset:
        predictions = tf.argmax(model(images, training=False), axis=-1, output_type=labels.dtype)
        correct += int(tf.reduce_sum(tf.cast(predictions == labels, tf.int32)))
        total += int(labels.shape[0])
    return correct / max(total, 1)
