"""An attack with a generative image prior (after GIAS, Jeon et al. 2021): the attacker first trains a
decoder on public images of the clients' distribution, then searches its latent codes for images whose
simulated update matches the captured one, then refines the pixels it decoded.

The attacker holds more than the other attacks' (public images of the same distribution: here the data
set's test split, which no client trains on); its success is that of a server with such data. Per problem
the position is [latent codes (N x latent) | pixel corrections (N x H x W x C) | lock latents]; the first
`latent_iterations` Adam steps move the codes only, the rest the corrections only (images =
clip(decoder(codes) + corrections, 0, 1)).
"""

import dataclasses

import numpy as np
import tensorflow as tf

from attacks import base
from attacks.ig import run_adam

UPSAMPLINGS = 3  # the decoder doubles a (H/8, W/8) map three times


def build_decoder(input_shape, latent_dim):
    """latent codes [k, latent_dim] -> images [k, *input_shape] in [0, 1] (H and W multiples of 8)."""
    height, width, channels = input_shape
    if height % 2**UPSAMPLINGS or width % 2**UPSAMPLINGS:
        raise ValueError(f"the decoder needs H and W that are multiples of 8, got {input_shape}")
    codes = tf.keras.Input((latent_dim,))
    x = tf.keras.layers.Dense(height // 8 * width // 8 * 128, activation="relu")(codes)
    x = tf.keras.layers.Reshape((height // 8, width // 8, 128))(x)
    for filters in (64, 32, 16):
        x = tf.keras.layers.Conv2DTranspose(filters, 4, 2, "same", activation="relu")(x)
    images = tf.keras.layers.Conv2D(channels, 3, 1, "same", activation="sigmoid")(x)
    return tf.keras.Model(codes, images, name="decoder")


def _build_encoder(input_shape, latent_dim):
    images = tf.keras.Input(input_shape)
    x = images
    for filters in (32, 64, 128):
        x = tf.keras.layers.Conv2D(filters, 4, 2, "same", activation="relu")(x)
    x = tf.keras.layers.Flatten()(x)
    return tf.keras.Model(images, [tf.keras.layers.Dense(latent_dim)(x), tf.keras.layers.Dense(latent_dim)(x)])


def train_decoder(images, latent_dim=32, epochs=15, batch_size=64, seed=0, log=print):
    """Trains a variational autoencoder on `images` [N, H, W, C] in [0, 1] (Adam 1e-3, Bernoulli likelihood,
    standard normal prior on the codes) and returns its decoder (`build_decoder`)."""
    images = np.asarray(images, np.float32)
    tf.random.set_seed(seed)
    encoder, decoder = _build_encoder(images.shape[1:], latent_dim), build_decoder(images.shape[1:], latent_dim)
    optimizer = tf.keras.optimizers.Adam(1e-3)
    variables = encoder.trainable_variables + decoder.trainable_variables

    @tf.function
    def step(batch):
        with tf.GradientTape() as tape:
            mean, log_variance = encoder(batch)
            codes = mean + tf.exp(0.5 * log_variance) * tf.random.normal(tf.shape(mean))
            decoded = tf.clip_by_value(decoder(codes), 1e-6, 1.0 - 1e-6)
            likelihood = tf.reduce_sum(batch * tf.math.log(decoded) + (1 - batch) * tf.math.log(1 - decoded), [1, 2, 3])
            divergence = 0.5 * tf.reduce_sum(tf.square(mean) + tf.exp(log_variance) - 1.0 - log_variance, 1)
            loss = tf.reduce_mean(divergence - likelihood)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        losses = [float(step(images[order[i : i + batch_size]])) for i in range(0, len(images), batch_size)]
        log(f"decoder: epoch {epoch + 1}/{epochs}, loss {np.mean(losses):.1f}")
    return decoder


@dataclasses.dataclass(frozen=True)
class PriorConfig(base.AttackConfig):
    """The generative-prior attack's hyperparameters (beyond `base.AttackConfig`).

    iterations: Adam steps in all; the first `latent_iterations` (None: three quarters) move the codes (at
      `learning_rate`), the rest the pixel corrections (at `refine_learning_rate`).
    latent_weight, tv: weights of the codes' Gaussian prior and of the images' total variation.
    distance: one of base.DISTANCES ('grnn', squared L2 plus L2: in the U16 pilot the latent search with IG's
      cosine recovered 1 image of 16, with this 8).
    label_mode: 'infer' or 'given' (never 'joint': the decoder makes no labels).
    lock_learning_rate: the adaptive attackers' step size for the lock latents (None: `learning_rate`).
    """

    iterations: int = 2000
    distance: str = "grnn"
    tv: float = 1e-4
    restarts: int = 2
    latent_iterations: int | None = None
    learning_rate: float = 0.05
    refine_learning_rate: float = 0.01
    latent_weight: float = 1e-4
    lock_learning_rate: float | None = None

    def __post_init__(self):
        super().__post_init__()
        base.check_lock_learning_rate(self.lock_learning_rate)
        if self.label_mode == "joint":
            raise ValueError("the prior attack takes its labels from the update ('infer') or given, not 'joint'")
        if self.latent_iterations is None:
            object.__setattr__(self, "latent_iterations", self.iterations * 3 // 4)
        if not 0 <= int(self.latent_iterations) <= self.iterations:
            raise ValueError(f"latent_iterations must be in [0, iterations], got {self.latent_iterations}")
        object.__setattr__(self, "latent_iterations", int(self.latent_iterations))


class GenerativePrior(base.Attack):
    """Latent search through a trained decoder, then pixel refinement; distance + latent_weight * mean(code^2)
    + tv * TV(images), Adam (`PriorConfig`).

    `decoder`: a Keras model, latent codes [k, latent] -> images [k, *attacker.input_shape] in [0, 1]
    (`train_decoder`).
    """

    name = "prior"
    Config = PriorConfig

    def __init__(self, attacker, decoder: tf.keras.Model, config: PriorConfig | None = None, **options) -> None:
        super().__init__(attacker, config, **options)
        if tuple(decoder.output_shape[1:]) != tuple(attacker.input_shape):
            raise ValueError(
                f"the decoder makes {decoder.output_shape[1:]} images, the model takes {attacker.input_shape}"
            )
        self.decoder, self.latent_dim = decoder, int(decoder.input_shape[-1])

    def _structure(self, target):
        return super()._structure(target) + (self.decoder,)

    def _layout(self, target):
        n = target.num_examples
        return n * self.latent_dim + n * int(np.prod(self.attacker.input_shape)), 0, self._lock_size(target)

    def _initial(self, target, problems, seed):
        n, pixels = target.num_examples, int(np.prod(self.attacker.input_shape))
        codes = np.random.default_rng(seed).standard_normal((problems, n * self.latent_dim))
        lock = self._initial_lock(target, problems, seed)
        return tf.constant(np.concatenate([codes, np.zeros((problems, n * pixels)), lock], axis=1), tf.float32)

    def _codes_and_corrections(self, position, target):
        n = target.num_examples
        codes = tf.reshape(position[: n * self.latent_dim], (n, self.latent_dim))
        size = n * int(np.prod(self.attacker.input_shape))
        corrections = tf.reshape(
            position[n * self.latent_dim : n * self.latent_dim + size], (n,) + self.attacker.input_shape
        )
        return codes, corrections, position[n * self.latent_dim + size :]

    def _split(self, position, target):
        codes, corrections, latent = self._codes_and_corrections(position, target)
        images = tf.clip_by_value(self.decoder(codes) + corrections, 0.0, 1.0)
        return images, tf.zeros((target.num_examples, 0)), latent

    def objective(self, position, target_values, fixed_labels, target):
        loss = super().objective(position, target_values, fixed_labels, target)
        codes = self._codes_and_corrections(position, target)[0]
        return loss + self.config.latent_weight * tf.reduce_mean(tf.square(codes))

    def _optimize(self, target, initial, target_values, fixed_labels, progress, monitor):
        config = self.config
        codes = target.num_examples * self.latent_dim
        lock_rate = config.learning_rate if config.lock_learning_rate is None else config.lock_learning_rate
        scale = self._lock_rate_scale(target, lock_rate / config.learning_rate)
        image_part, _, lock_size = self._layout(target)
        in_codes = tf.concat([tf.ones([codes]), tf.zeros([image_part - codes + lock_size])], 0)
        in_pixels = tf.concat([tf.zeros([codes]), tf.ones([image_part - codes]), tf.zeros([lock_size])], 0)
        in_lock = 1.0 - in_codes - in_pixels
        refining = in_pixels * (config.refine_learning_rate / config.learning_rate)

        def learning_rate(step):
            stage = tf.where(step > config.latent_iterations, refining, in_codes)
            return scale(step) * (stage + in_lock) * config.learning_rate

        return run_adam(
            self,
            target,
            initial,
            target_values,
            fixed_labels,
            learning_rate,
            False,
            lambda p: p,
            progress,
            monitor,
            fresh_at=config.latent_iterations,
        )
