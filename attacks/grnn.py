"""GRNN (Ren et al. 2022): a generator network, not the pixels, is trained so that the gradient of
its fake image and fake label matches the captured one (loss: squared L2 + L2 + TV).

Per problem the generator maps a fixed random code to the N fake images (nearest-neighbour
upsampling blocks, sigmoid output) and, through a second dense branch, to N label logits. Its
weights are the flat optimisation vector, so restarts and images run batched like the other attacks.
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

from attacks import base
from attacks.ig import run_adam

ADAPTIVE_LOCK_LEARNING_RATE = 0.01  # the lock latents' step under the adaptive strategies (see GRNNConfig)


@dataclasses.dataclass(frozen=True)
class GRNNConfig(base.AttackConfig):
    """GRNN's hyperparameters (beyond `base.AttackConfig`).

    iterations, learning_rate: Adam steps and step size (the paper: RMSprop 1e-4, 20k steps).
    tv: weight of the TV prior (the paper: 1e-6).
    distance: 'grnn' (squared L2 + L2), or 'l2'/'cosine'.
    code_dim, width: the generator's random code length and base width.
    label_mode: 'infer' (iDLG labels; default: the joint branch got stuck on a wrong label in our runs) or
      'joint' (the generator's label branch, as GRNN).
    lock_learning_rate: the lock latents' Adam step size (None: ADAPTIVE_LOCK_LEARNING_RATE under threat
      'adaptive' with a strategy other than 'joint', else `learning_rate`). At the generator's 1e-3 the latents
      barely leave their start in a few thousand steps, which left the first adaptive GRNN at 0 %.
    """

    iterations: int = 2000
    distance: str = "grnn"
    tv: float = 1e-6
    learning_rate: float = 1e-3
    code_dim: int = 64
    width: int = 32
    lock_learning_rate: float | None = None

    def __post_init__(self):
        super().__post_init__()
        base.check_adam_rates(self)


class GRNN(base.Attack):
    """GRNN with the gradient distance 'grnn' (or 'l2'/'cosine'), Adam on the generator weights (`GRNNConfig`)."""

    name = "grnn"
    Config = GRNNConfig

    def __init__(self, attacker, config=None, **options):
        super().__init__(attacker, config, **options)
        height, width_px, _ = attacker.input_shape
        if height != width_px or height % 4 or (height // 4) & (height // 4 - 1):
            raise ValueError(f"GRNN's generator needs square inputs of 4 * 2^k pixels, got {attacker.input_shape}")
        self.blocks = int(math.log2(height // 4))

    def _shapes(self):
        channels = self.attacker.input_shape[-1]
        widths = [self.config.width] + [max(self.config.width // 2 ** (i + 1), 8) for i in range(self.blocks - 1)]
        shapes = [(self.config.code_dim, 16 * self.config.width), (16 * self.config.width,)]
        previous = self.config.width
        for w in widths:
            shapes += [(3, 3, previous, w), (w,)]
            previous = w
        shapes += [
            (3, 3, previous, channels),
            (channels,),
            (self.config.code_dim, self.attacker.num_classes),
            (self.attacker.num_classes,),
        ]
        return shapes

    def _layout(self, target):
        generator = sum(int(np.prod(s)) for s in self._shapes())
        return generator, 0, self._lock_size(target)

    def _initial(self, target, problems, seed):
        rng = np.random.default_rng(seed)
        parts = []
        for shape in self._shapes():
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
            bound = math.sqrt(6.0 / fan_in) if len(shape) > 1 else 0.0
            parts.append(rng.uniform(-bound, bound, (problems, int(np.prod(shape)))))
        parts.append(self._initial_lock(target, problems, seed))
        self._codes = tf.constant(
            np.random.default_rng(seed + 1).standard_normal((target.num_examples, self.config.code_dim)), tf.float32
        )
        return tf.constant(np.concatenate(parts, axis=1), tf.float32)

    def _split(self, position, target):
        weights, offset = [], 0
        for shape in self._shapes():
            size = int(np.prod(shape))
            weights.append(tf.reshape(position[offset : offset + size], shape))
            offset += size
        x = tf.reshape(
            tf.nn.leaky_relu(tf.matmul(self._codes, weights[0]) + weights[1], 0.2), (-1, 4, 4, self.config.width)
        )
        for i in range(self.blocks):
            x = tf.image.resize(x, (x.shape[1] * 2, x.shape[2] * 2), method="nearest")
            x = tf.nn.leaky_relu(tf.nn.conv2d(x, weights[2 + 2 * i], 1, "SAME") + weights[3 + 2 * i], 0.2)
        images = tf.sigmoid(tf.nn.conv2d(x, weights[-4], 1, "SAME") + weights[-3])
        label_logits = tf.matmul(self._codes, weights[-2]) + weights[-1]
        return images, label_logits, position[offset:]

    def _optimize(self, target, initial, target_values, fixed_labels, progress, monitor):
        config = self.config
        lock_rate = config.lock_learning_rate
        if lock_rate is None:
            lock_rate = ADAPTIVE_LOCK_LEARNING_RATE if self.adaptive else config.learning_rate
        scale = self._lock_rate_scale(target, lock_rate / config.learning_rate)
        return run_adam(
            self,
            target,
            initial,
            target_values,
            fixed_labels,
            lambda step: scale(step) * config.learning_rate,
            False,
            lambda p: p,
            progress,
            monitor,
        )
