"""The common attack machinery: parameter layout, objectives, batched problems, results.

Every attack optimises, per problem, one flat vector [images | label logits | lock latents]. Several
problems (images to attack x restarts) run at once: `tf.vectorized_map` evaluates each problem's
objective and gradient independently (each with its own batch statistics), so one compiled call
serves them all, on CPU or GPU.
"""

import collections
from collections.abc import Callable
import dataclasses
import time
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from attacks import labels as labels_lib
from attacks import targets as targets_lib
from attacks.model import DEAD_LATENT

if TYPE_CHECKING:
    from attacks.model import AttackerModel

DISTANCES = ("l2", "l2_sum", "cosine", "grnn")
LABEL_MODES = ("infer", "joint", "given")


@dataclasses.dataclass(frozen=True)
class AdaptiveStrategy:
    """How the adaptive attacker (threat 'adaptive' only) searches the unknown gamma/beta.

    lock_starts: the lock latents' start schemes, cycled over the restarts (`AttackerModel.initial_lock_latent`).
    fixes_dead_channels: channels whose gamma must be 0, read from the captured gradient
      (`AttackerModel.dead_lock_channels`), are fixed at gamma = 0.
    alternates: the images and the lock latents take turns, ALTERNATION_STEPS steps each, instead of moving
      together (block-coordinate descent).
    """

    lock_starts: tuple
    fixes_dead_channels: bool = False
    alternates: bool = False


ADAPTIVE_STRATEGIES = {  # attacks.names.ADAPTIVE_STRATEGIES, in its order
    "joint": AdaptiveStrategy(("uniform",)),
    "prior": AdaptiveStrategy(("prior",)),
    "mixed": AdaptiveStrategy(("prior", "uniform")),
    "relearn": AdaptiveStrategy(("prior",), fixes_dead_channels=True),
    "relearn-mixed": AdaptiveStrategy(("prior", "uniform"), fixes_dead_channels=True),
    "relearn-uniform": AdaptiveStrategy(("uniform",), fixes_dead_channels=True),
    "relearn-alternating": AdaptiveStrategy(("prior",), fixes_dead_channels=True, alternates=True),
}
ALTERNATION_STEPS = 50
DEFAULT_ADAPTIVE_STRATEGY = "relearn"
SHARED_FUNCTIONS_KEPT = 16
_shared_functions = collections.OrderedDict()  # (attack structure, role) -> tf.function (Attack._shared_function)


def check_lock_learning_rate(value):
    """`value` (None or a positive float) or one clear ValueError."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"lock_learning_rate must be None or a positive number, got {value!r}")
    return float(value)


def check_adam_rates(config):
    """An Adam attack's config: a positive `learning_rate` and a valid `lock_learning_rate` (ValueError)."""
    check_lock_learning_rate(config.lock_learning_rate)
    if not config.learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {config.learning_rate}")


def check_distance(value):
    """`value` (one of DISTANCES) or one clear ValueError."""
    if value not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """The hyperparameters every attack takes; each attack's config (`DLGConfig`, `IGConfig`, ...) adds its
    own and sets its defaults. Frozen and validated on creation: a bad value is one clear ValueError.

    iterations: optimiser steps in all; chunk: steps per compiled call, between progress reports.
    distance: the gradient distance (one of DISTANCES, see `gradient_distance`); tv: total-variation weight.
    label_mode: 'infer' (iDLG rule from the last layer's gradient/update), 'joint' (label logits optimised with
      the image, DLG) or 'given' (labels passed to `reconstruct`).
    restarts: independent starts per target; the one with the lowest objective is kept.
    label_hypotheses: with label_mode='infer' on batches, restart r assumes the (r mod this)-th most plausible
      label counts, on multi-step updates the (r mod this)-th most plausible labels of each local step
      (`labels.label_hypotheses`).
    seed: seeds the starting points.
    adaptive_strategy: under threat 'adaptive', how the unknown gamma/beta are searched (a key of
      ADAPTIVE_STRATEGIES; see attacks/README.md); None: the attack's `default_adaptive_strategy`, the strongest
      measured for it (experiments.studies.adaptive_attacker). The restart kept is always the one with the lowest
      objective. Ignored under the other threats.
    """

    iterations: int = 1000
    chunk: int = 250
    distance: str = "l2"
    tv: float = 0.0
    label_mode: str = "infer"
    restarts: int = 1
    label_hypotheses: int = 1
    seed: int = 0
    adaptive_strategy: str | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):  # 1500.0 iterations, a learning rate of 1: the declared type
            value = getattr(self, field.name)
            if field.type in (int, float, bool) and value is not None:
                object.__setattr__(self, field.name, field.type(value))
        check_distance(self.distance)
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be 'infer', 'joint' or 'given', got {self.label_mode!r}")
        if self.adaptive_strategy is not None and self.adaptive_strategy not in ADAPTIVE_STRATEGIES:
            raise ValueError(
                f"adaptive_strategy must be one of {tuple(ADAPTIVE_STRATEGIES)}, got {self.adaptive_strategy!r}"
            )
        for name in ("iterations", "chunk", "restarts", "label_hypotheses"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.tv < 0:
            raise ValueError(f"tv must be non-negative, got {self.tv}")


@dataclasses.dataclass
class Reconstruction:
    """One attacked target: images in [0, 1] (and unclipped), labels, and how the search went."""

    images: np.ndarray
    raw_images: np.ndarray
    labels: np.ndarray
    loss: float
    history: list
    info: dict


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The search between two chunks, as a `monitor` sees it: iterations done, batched objective
    evaluations so far, optimisation wall time so far (progress and monitor calls excluded), the
    current images [problems, N, H, W, C] (unclipped) and losses [problems]."""

    done: int
    evaluations: int
    seconds: float
    images: np.ndarray
    losses: np.ndarray


def total_variation(images):
    """Mean absolute difference of neighbouring pixels (IG's TV), summed over both axes."""
    dy = tf.reduce_mean(tf.abs(images[:, 1:] - images[:, :-1]))
    dx = tf.reduce_mean(tf.abs(images[:, :, 1:] - images[:, :, :-1]))
    return dx + dy


def gradient_distance(predicted, target, distance):
    """'l2_sum': sum of squared differences (the original DLG's); 'l2': the same divided by the
    target's squared norm (the same minimiser, at a scale tfp's L-BFGS handles well); 'cosine':
    1 - cosine similarity of the concatenations (IG's); 'grnn': squared L2 plus L2, divided as 'l2'
    (GRNN's, without its TV term)."""
    norm_t = tf.add_n([tf.reduce_sum(tf.square(t)) for t in target]) + 1e-30
    if distance == "cosine":
        dot = tf.add_n([tf.reduce_sum(p * t) for p, t in zip(predicted, target)])
        norm_p = tf.add_n([tf.reduce_sum(tf.square(p)) for p in predicted])
        return 1.0 - dot * tf.math.rsqrt(norm_p * norm_t + 1e-30)
    squared_sum = tf.add_n([tf.reduce_sum(tf.square(p - t)) for p, t in zip(predicted, target)])
    if distance == "l2_sum":
        return squared_sum
    squared = squared_sum / norm_t
    return squared if distance == "l2" else squared + tf.sqrt(squared + 1e-12)


def _unordered(labels, order):
    """The shared set's labels from one member's `labels` in its training `order` (labels[j] is image order[j]'s)."""
    shared = np.empty_like(np.asarray(labels))
    shared[np.asarray(order)] = labels
    return shared


def _scale(target):
    """Updates are matched in gradient units (divided by the learning rate) to keep L2 well scaled."""
    return 1.0 / target.learning_rate if target.kind == "update" else 1.0


class Attack:
    """Base of the optimisation attacks: an attacker (`attacks.AttackerModel`, the server's view under one
    threat model) and one frozen config of hyperparameters (`Config`, an `AttackConfig`).

    `Attack(attacker, config)`, or `Attack(attacker, **options)` for `Config(**options)`.
    """

    name = "attack"
    Config = AttackConfig
    default_adaptive_strategy = DEFAULT_ADAPTIVE_STRATEGY  # the strongest measured for this attack
    takes_turns = True  # its optimiser can move the images and the lock in turns (alternating strategies)

    def __init__(self, attacker: "AttackerModel", config: AttackConfig | None = None, **options) -> None:
        if config is not None and options:
            raise TypeError("pass a config or keyword options, not both")
        config = self.Config(**options) if config is None else config
        if type(config) is not self.Config:
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.attacker, self.config = attacker, config
        self.adaptive_strategy = config.adaptive_strategy or self.default_adaptive_strategy
        self.strategy = ADAPTIVE_STRATEGIES[self.adaptive_strategy]

    @property
    def adaptive(self):
        """True when the threat is 'adaptive' and its strategy is not the first attacker's ('joint')."""
        return self.attacker.threat == "adaptive" and self.adaptive_strategy != "joint"

    def _lock_schemes(self, problems):
        """The lock latents' start scheme of each problem (problem p is restart p % restarts)."""
        if self.attacker.threat != "adaptive":
            return ["uniform"] * problems
        schemes = self.strategy.lock_starts
        return [schemes[(p % self.config.restarts) % len(schemes)] for p in range(problems)]

    def _fixes_dead_channels(self, target):
        return (
            self.attacker.threat == "adaptive"
            and self.strategy.fixes_dead_channels
            and isinstance(target, targets_lib.Target)
            and target.kind == "gradient"
        )

    def _lock_latent(self, latent, target_values, target):
        """The lock latents as the model uses them: under the 'relearn' strategies (single gradients) the
        gamma latents of channels the captured gradient shows dead are replaced by a constant (gamma = 0
        exactly, no gradient to them)."""
        if not self._fixes_dead_channels(target):
            return latent
        dead = self.attacker.dead_lock_channels(target_values)
        return tf.where(dead, tf.constant(DEAD_LATENT, latent.dtype), latent)

    def _lock_rate_scale(self, target, lock_ratio):
        """step -> [position size] multipliers of an optimiser's step: 1 on images and labels, `lock_ratio`
        on the lock latents; under an alternating strategy one side is 0 in turn (images first)."""
        image_size, label_size, lock_size = self._layout(target)
        scale = tf.concat([tf.ones([image_size + label_size]), tf.fill([lock_size], float(lock_ratio))], 0)
        if not (self.attacker.threat == "adaptive" and self.strategy.alternates):
            return lambda step: scale
        lock_part = tf.concat([tf.zeros([image_size + label_size]), tf.ones([lock_size])], 0)

        def alternating(step):
            lock_turn = tf.math.floormod(tf.floor((step - 1.0) / ALTERNATION_STEPS), 2.0)
            return scale * (lock_turn * lock_part + (1.0 - lock_turn) * (1.0 - lock_part))

        return alternating

    # -- layout ----------------------------------------------------------------------------
    def _layout(self, target):
        n = target.num_examples
        image_size = n * int(np.prod(self.attacker.input_shape))
        label_size = n * self.attacker.num_classes if self.config.label_mode == "joint" else 0
        return image_size, label_size, self._lock_size(target)

    def _lock_size(self, target):
        """The lock latents' length: the attacker's, and under a drifting pool one offset of it per member."""
        drifts = target.count if isinstance(target, targets_lib.Pooled) and target.drift else 0
        return self.attacker.lock_latent_size() * (1 + drifts)

    def _initial_lock(self, target, problems, seed):
        """[problems, lock size] start values of the lock latents (a drifting pool's offsets start at 0)."""
        shared = self.attacker.initial_lock_latent(problems, seed, self._lock_schemes(problems)).numpy()
        return np.concatenate([shared, np.zeros((problems, self._lock_size(target) - shared.shape[1]))], 1)

    def _model_tensors(self, target):
        """The attacker's tensors a compiled attack on `target` takes (`AttackerModel.tensors`, stacked per
        member for a pool)."""
        if isinstance(target, targets_lib.Pooled):
            return targets_lib.pooled_tensors(self.attacker, target)
        return self.attacker.tensors()

    def _split(self, position, target):
        image_size, label_size, _ = self._layout(target)
        images = tf.reshape(position[:image_size], (target.num_examples,) + self.attacker.input_shape)
        label_logits = tf.reshape(position[image_size : image_size + label_size], (target.num_examples, -1))
        return images, label_logits, position[image_size + label_size :]

    def _initial(self, target, problems, seed):
        image_size, label_size, _ = self._layout(target)
        rng = np.random.default_rng(seed)
        parts = [self._initial_images(rng, problems, image_size)]
        if label_size:
            parts.append(rng.standard_normal((problems, label_size)))
        parts.append(self._initial_lock(target, problems, seed))
        return tf.constant(np.concatenate(parts, axis=1), tf.float32)

    def _initial_images(self, rng, problems, size):
        return rng.standard_normal((problems, size))

    # -- objective -------------------------------------------------------------------------
    def objective(self, position, target_values, fixed_labels, target):
        """The scalar loss of one problem: the gradient distance (`self.config.distance`), plus `self.config.tv` times
        the candidate images' total variation."""
        images, predicted = self._candidate(position, target_values, fixed_labels, target)
        loss = self._distance(predicted, target_values, target)
        if self.config.tv:
            loss += self.config.tv * total_variation(images)
        return loss + self._drift_penalty(position, target)

    def _distance(self, predicted, target_values, target, held_out=False):
        """The gradient distance; for a pool the mean of its members' distances, each on the entries it fits
        (or, `held_out`, on those it leaves out)."""
        if not isinstance(target, targets_lib.Pooled):
            return gradient_distance(predicted, target_values, self.config.distance)
        size, distances = len(target_values) // target.count, []
        for k in range(target.count):
            pairs = list(zip(predicted[k * size : (k + 1) * size], target_values[k * size : (k + 1) * size]))
            if target.holdout:
                masks = [target.held_out(k * size + i, t.shape) == held_out for i, (_, t) in enumerate(pairs)]
                pairs = [(tf.where(m, p, 0.0), tf.where(m, t, 0.0)) for m, (p, t) in zip(masks, pairs)]
            distances.append(gradient_distance(*zip(*pairs), self.config.distance))
        return tf.add_n(distances) / target.count

    def _drift_penalty(self, position, target):
        """`drift` times the mean square of a drifting pool's per-member lock offsets (0 otherwise)."""
        if not (isinstance(target, targets_lib.Pooled) and target.drift):
            return 0.0
        offsets = position[position.shape[0] - self._lock_size(target) + self.attacker.lock_latent_size() :]
        return target.drift * tf.reduce_mean(tf.square(offsets))

    def _candidate(self, position, target_values, fixed_labels, target, transform=None):
        images, label_logits, latent = self._split(position, target)
        if transform is not None:
            images = transform(images)
        labels = label_logits if self.config.label_mode == "joint" else fixed_labels
        latent = self._lock_latent(latent, target_values, target)
        predicted = [p * _scale(target) for p in targets_lib.simulate(self.attacker, target, images, labels, latent)]
        if target.pruned:  # the pruned entries say nothing: compare the kept ones
            predicted = [tf.where(t != 0, p, tf.zeros_like(p)) for p, t in zip(predicted, target_values)]
        return images, predicted

    def _batched_value_and_gradients(self, target):
        """f(positions [P, n], target values [P, ...], labels [P, N], model tensors) -> (values [P], grads [P, n]),
        model tensors being `AttackerModel.tensors()`.

        A `tf.function` kept out of line: the optimisers call it from several places (tfp's line search
        has about ten), and each call site would otherwise vectorise the second-order gradient again and
        have its copy optimised apart; traced and optimised once, every call site runs the same graph. Shared
        by the attacks of one structure (`_shared_function`). Traced without autograph, as the optimisers' own
        functions: their Python branches are on static values, and converting the code only costs tracing time."""

        def one(args):
            position, target_values, fixed_labels = args
            with tf.GradientTape() as tape:
                tape.watch(position)
                value = self.objective(position, target_values, fixed_labels, target)
            return value, tape.gradient(value, position)

        def batched(positions, target_values, fixed_labels, model_tensors):
            with self.attacker.bound(model_tensors):
                if target.kind == "gradient":
                    return tf.vectorized_map(one, (positions, target_values, fixed_labels))
                # Simulated local steps give each problem its own weights, which pfor cannot batch.
                return tf.map_fn(
                    one,
                    (positions, target_values, fixed_labels),
                    parallel_iterations=4,
                    fn_output_signature=(tf.float32, tf.float32),
                )

        return self._shared_function(
            target,
            "value_and_gradients",
            lambda: tf.function(batched, autograph=False, experimental_attributes={"_noinline": True}),
        )

    def _structure(self, target):
        """Everything a compiled search of this attack depends on besides the tensors it takes as arguments."""
        return type(self), self.config, self.adaptive_strategy, self.attacker.structure(), target.settings()

    def _shared_function(self, target, role, build):
        """The compiled function `build()` makes for `role`, shared by every attack of the same structure
        (`_structure`; e.g. threats 'oracle' and 'fixed-key' on one victim): it takes the attacker's tensors as
        arguments, so it is traced once for all of them. The SHARED_FUNCTIONS_KEPT most recent are kept."""
        key = (self._structure(target), role)
        if key in _shared_functions:
            _shared_functions.move_to_end(key)
        else:
            _shared_functions[key] = build()
            while len(_shared_functions) > SHARED_FUNCTIONS_KEPT:
                _shared_functions.popitem(last=False)
        return _shared_functions[key]

    # -- driver ----------------------------------------------------------------------------
    def reconstruct(
        self,
        targets: "targets_lib.Target | targets_lib.Pooled | list",
        labels: np.ndarray | None = None,
        progress: Callable | None = None,
        monitor: Callable | None = None,
    ) -> "list[Reconstruction]":
        """Attacks each target (a `Target`, a `Pooled` one, or a list of them, all of one kind and size).

        Returns one `Reconstruction` per target. `labels` ([targets, N] ints) only with
        label_mode='given'; `progress(done, total, best_losses)` is called between chunks, then
        `monitor(Snapshot)`, which stops the search by returning True (e.g. a benchmark that holds
        the truth and stops at a target PSNR; the attack never sees what it compares with)."""
        single = isinstance(targets, (targets_lib.Target, targets_lib.Pooled))
        targets = [targets] if single else list(targets)
        template = targets[0]
        if any((t.kind, t.num_examples) != (template.kind, template.num_examples) for t in targets):
            raise ValueError("all targets of one reconstruct call need the same kind and number of examples")
        if (labels is not None) != (self.config.label_mode == "given"):
            raise ValueError("labels are passed exactly when label_mode='given'")
        if self.config.label_mode == "joint":
            labels = np.zeros((len(targets), template.num_examples), np.int64)
        problems = len(targets) * self.config.restarts
        repeat = lambda a: np.repeat(np.asarray(a)[None], self.config.restarts, 0)  # noqa: E731
        target_values = [
            tf.constant(np.concatenate([repeat(t.values[i]) for t in targets]) * _scale(template))
            for i in range(len(template.values))
        ]
        if self.config.label_mode == "infer":  # restart r assumes the (r mod hypotheses)-th most plausible labels
            hypotheses = min(self.config.label_hypotheses, self.config.restarts)
            labelings = [self._label_hypotheses(t, hypotheses) for t in targets]
            fixed_labels = np.stack([h[r % len(h)] for h in labelings for r in range(self.config.restarts)])
        else:
            labels = np.asarray(labels, np.int64).reshape(len(targets), template.num_examples)
            fixed_labels = np.repeat(labels, self.config.restarts, 0)
        fixed_labels = tf.constant(fixed_labels)
        start = time.perf_counter()
        positions, losses, history, stats = self._optimize(
            template,
            self._initial(template, problems, self.config.seed),
            target_values,
            fixed_labels,
            progress,
            monitor,
        )
        seconds = time.perf_counter() - start
        losses = np.asarray(losses).reshape(len(targets), self.config.restarts)
        positions = np.asarray(positions).reshape(len(targets), self.config.restarts, -1)
        results = []
        for t, target in enumerate(targets):
            best = int(np.nanargmin(np.where(np.isfinite(losses[t]), losses[t], np.inf)))
            results.append(
                self._result(
                    target,
                    positions[t, best],
                    fixed_labels[t * self.config.restarts + best].numpy(),
                    losses[t],
                    best,
                    history,
                    dict(stats, seconds=seconds, problems=problems),
                )
            )
        return results[0] if single else results

    def _label_hypotheses(self, target, count):
        """`labels.label_hypotheses` of a target; of a pool, member by member on its own round's weights, the
        i-th hypothesis being each member's i-th (its last if it has fewer); of a pool whose members share their
        images (`Pooled.orders`), the first member's, placed in the shared set's order."""
        if not isinstance(target, targets_lib.Pooled):
            return labels_lib.label_hypotheses(self.attacker, target, count)
        per_member = labels_lib.member_hypotheses(self.attacker, target, count, None if target.orders is None else 1)
        if target.orders is not None:
            return [_unordered(labels, target.orders[0]) for labels in per_member[0]]
        total = max(len(h) for h in per_member)
        return [np.concatenate([h[min(i, len(h) - 1)] for h in per_member]) for i in range(total)]

    def held_out_loss(self, position, target, labels):
        """The distance of one problem's `position` on the entries a pool leaves out of the fit (`Pooled.holdout`)."""
        values = [tf.constant(v * _scale(target), tf.float32) for v in target.values]
        with self.attacker.bound(self._model_tensors(target)):
            predicted = self._candidate(tf.constant(position), values, tf.constant(labels), target)[1]
            return float(self._distance(predicted, values, target, held_out=True))

    def _result(self, target, position, fixed_labels, losses, best, history, stats):
        images, label_logits, latent = self._split(tf.constant(position), target)
        images = self._output_images(images, position, target)
        if self.config.label_mode == "joint":
            labels = np.argmax(label_logits.numpy(), axis=-1)
        else:
            labels = fixed_labels
        info = dict(
            stats,
            attack=self.name,
            threat=self.attacker.threat,
            restart_losses=[float(v) for v in losses],
            best_restart=best,
            label_mode=self.config.label_mode,
        )
        if isinstance(target, targets_lib.Pooled):
            info.update(pooled=target.count, drift=target.drift)
            if target.holdout:
                info["held_out_loss"] = self.held_out_loss(position, target, fixed_labels)
        if self.attacker.threat == "adaptive":
            info["adaptive_strategy"] = self.adaptive_strategy
            if self._fixes_dead_channels(target):
                info["dead_channels"] = int(
                    tf.reduce_sum(tf.cast(self.attacker.dead_lock_channels(target.values), tf.int32))
                )
            latent = self._lock_latent(latent, list(target.values), target)
            locks = self.attacker.lock_values(latent)
            info["lock_estimate"] = {k: [g.numpy().tolist(), b.numpy().tolist()] for k, (g, b) in locks.items()}
        raw = images.numpy()
        return Reconstruction(np.clip(raw, 0.0, 1.0), raw, np.asarray(labels), float(losses[best]), history, info)

    def _output_images(self, images, position, target):
        return images

    def _run_chunks(self, target, advance, progress, monitor):
        """Calls `advance()` -> (done, positions, losses, evaluations, finished) until `self.config.iterations`
        are done, it reports `finished` or the monitor stops it; keeps the history, reports between
        chunks and times the search without the reports. Returns what `_optimize` returns."""
        history, seconds, done, finished = [], 0.0, 0, False
        while done < self.config.iterations and not finished:
            start = time.perf_counter()
            done, positions, losses, evaluations, finished = advance()
            losses = np.nan_to_num(np.asarray(losses, np.float64), nan=np.inf)
            history.append({"iteration": int(done), "evaluations": int(evaluations), "loss": losses.tolist()})
            seconds += time.perf_counter() - start
            if progress:
                progress(done, self.config.iterations, losses)
            if monitor and monitor(
                Snapshot(int(done), int(evaluations), seconds, self._snapshot_images(positions, target), losses)
            ):
                break
        stats = {"iterations": int(done), "evaluations": int(evaluations), "optimizer_seconds": seconds}
        return np.asarray(positions), history[-1]["loss"], history, stats

    def _snapshot_images(self, positions, target):
        return np.stack([self._output_images(self._split(p, target)[0], p, target).numpy() for p in positions])

    def _optimize(self, target, initial, target_values, fixed_labels, progress, monitor):
        """Returns (final positions [P, n], final losses [P], history, stats), usually those of
        `_run_chunks` with an `advance` that runs one compiled chunk."""
        raise NotImplementedError
