"""Inverting Gradients (Geiping et al. 2020): cosine gradient distance + total variation, Adam,
step decay, optional signed gradients, images boxed to [0, 1], several restarts."""

import dataclasses

import tensorflow as tf

from attacks import base


def adam_chunk(value_and_gradients, position, m, v, step, iterations, learning_rate, signed, project, fresh_at=0):
    """`iterations` Adam steps (TF loop, no Python in it) from `position` with moments (m, v); after step
    `fresh_at` (> 0) the moments start again from zero, as a new Adam would."""
    beta_1, beta_2, epsilon = 0.9, 0.999, 1e-8
    for _ in tf.range(iterations):
        _, gradient = value_and_gradients(position)
        if signed:
            gradient = tf.sign(gradient)
        step += 1.0
        if fresh_at:  # a new Adam from step fresh_at + 1
            keep = tf.cast(tf.not_equal(step, fresh_at + 1.0), tf.float32)
            m, v = m * keep, v * keep
        count = tf.where(step > fresh_at, step - fresh_at, step) if fresh_at else step
        m = beta_1 * m + (1 - beta_1) * gradient
        v = beta_2 * v + (1 - beta_2) * tf.square(gradient)
        m_hat, v_hat = m / (1 - beta_1**count), v / (1 - beta_2**count)
        position = project(position - learning_rate(step) * m_hat / (tf.sqrt(v_hat) + epsilon))
    return position, m, v, step


def run_adam(
    attack, target, initial, target_values, fixed_labels, learning_rate, signed, project, progress, monitor, fresh_at=0
):
    """Adam from `initial` for `attack.config.iterations` steps, compiled in chunks of `attack.config.chunk`
    (`base.Attack._run_chunks`), its moments started again after step `fresh_at` if given; returns what
    `base.Attack._optimize` returns."""
    batched = attack._batched_value_and_gradients(target)
    arguments = (target_values, fixed_labels, attack._model_tensors(target))

    def build():
        @tf.function
        def run(position, m, v, step, iterations, arguments):
            return adam_chunk(
                lambda p: batched(p, *arguments),
                position,
                m,
                v,
                step,
                iterations,
                learning_rate,
                signed,
                project,
                fresh_at,
            )

        return run

    run = attack._shared_function(target, "adam", build)
    position, m, v, step, done = initial, tf.zeros_like(initial), tf.zeros_like(initial), tf.constant(0.0), 0

    def advance():
        nonlocal position, m, v, step, done
        count = min(attack.config.chunk, attack.config.iterations - done)
        position, m, v, step = run(position, m, v, step, tf.constant(count), arguments)
        done += count
        return done, position, batched(position, *arguments)[0], done, False

    return attack._run_chunks(target, advance, progress, monitor)


@dataclasses.dataclass(frozen=True)
class IGConfig(base.AttackConfig):
    """Inverting Gradients' hyperparameters (beyond `base.AttackConfig`).

    iterations, learning_rate, tv: Adam steps, initial step size, TV weight (IG: 4800, 0.1, 1e-1 at ImageNet
      scale; 1e-4..1e-2 suits 32x32 here).
    signed: use the sign of the gradient (IG's 'signed' option).
    boxed: project the images to [0, 1] after each step.
    distance: 'cosine' (IG) or 'l2'.
    lock_learning_rate: the adaptive attackers' step size for the lock latents (None: `learning_rate`; it
      follows the same decay).
    """

    iterations: int = 2000
    distance: str = "cosine"
    tv: float = 1e-3
    restarts: int = 4
    learning_rate: float = 0.1
    signed: bool = True
    boxed: bool = True
    lock_learning_rate: float | None = None

    def __post_init__(self):
        super().__post_init__()
        base.check_adam_rates(self)


class InvertingGradients(base.Attack):
    """IG: 1 - cos(grad', grad) + tv * TV(x'), Adam with learning-rate steps x0.1 at 3/8, 5/8, 7/8 (`IGConfig`)."""

    name = "ig"
    Config = IGConfig

    def _initial_images(self, rng, problems, size):
        return rng.uniform(0.0, 1.0, (problems, size)) if self.config.boxed else rng.standard_normal((problems, size))

    def _optimize(self, target, initial, target_values, fixed_labels, progress, monitor):
        config = self.config
        image_size = self._layout(target)[0]
        total = float(config.iterations)
        milestones = tf.constant([3 / 8 * total, 5 / 8 * total, 7 / 8 * total])
        lock_rate = config.learning_rate if config.lock_learning_rate is None else config.lock_learning_rate
        scale = self._lock_rate_scale(target, lock_rate / config.learning_rate)

        def learning_rate(step):
            return scale(step) * config.learning_rate * 0.1 ** tf.reduce_sum(tf.cast(step >= milestones, tf.float32))

        def project(position):
            if not config.boxed:
                return position
            return tf.concat([tf.clip_by_value(position[:, :image_size], 0.0, 1.0), position[:, image_size:]], 1)

        return run_adam(
            self, target, initial, target_values, fixed_labels, learning_rate, config.signed, project, progress, monitor
        )
