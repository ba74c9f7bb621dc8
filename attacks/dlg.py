"""DLG (Zhu et al. 2019) and iDLG (Zhao et al. 2020): L2 gradient matching with L-BFGS.

DLG optimises the image and soft label logits jointly; iDLG fixes the label analytically first.
L-BFGS runs on the batch of independent problems (one per image and restart), either tfp's
`lbfgs_minimize` (Hager-Zhang line search; it needs DLG-like evaluation counts, thousands, so
`iterations` is large by default) or `attacks.lbfgs.TorchLBFGS` (torch.optim.LBFGS with lr 1 and no
line search, the original DLG's optimiser). Either resumes from its full state after each chunk, so
chunking changes only where progress is reported, not the path.
"""

import dataclasses

import tensorflow as tf

from attacks import base, lbfgs

OPTIMIZERS = ("tfp", "torch")


@dataclasses.dataclass(frozen=True)
class DLGConfig(base.AttackConfig):
    """DLG's hyperparameters (beyond `base.AttackConfig`).

    iterations: in total, L-BFGS iterations (optimizer 'tfp', each several objective evaluations) or torch
      L-BFGS steps (optimizer 'torch', up to 20 evaluations each; the original DLG runs 300).
    chunk: per compiled call, between progress reports: iterations ('tfp') or objective evaluations ('torch').
    distance: 'l2' (DLG's, normalised), 'l2_sum' (DLG's as written) or 'cosine'.
    tv: weight of a total-variation prior (0 in DLG).
    history_size: L-BFGS correction pairs (PyTorch's default 100).
    optimizer: 'tfp' or 'torch' (see the module docstring).
    """

    label_mode: str = "joint"
    history_size: int = 100
    optimizer: str = "tfp"

    def __post_init__(self):
        super().__post_init__()
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        strategy = base.ADAPTIVE_STRATEGIES.get(self.adaptive_strategy)
        if strategy and strategy.alternates:
            raise ValueError(f"L-BFGS moves every coordinate at once: DLG cannot use {self.adaptive_strategy!r}")


@dataclasses.dataclass(frozen=True)
class IDLGConfig(DLGConfig):
    """iDLG's hyperparameters: DLG's, with the labels recovered analytically ('infer')."""

    label_mode: str = "infer"


class DLG(base.Attack):
    """DLG: `distance` between the candidate's and the captured gradient/update, L-BFGS (`DLGConfig`)."""

    name = "dlg"
    Config = DLGConfig
    # Measured (experiments.studies.adaptive_attacker, 30 images): the L-BFGS attacks do best from 'joint''s starts
    # (iDLG 9/30, DLG 3/30) and worse with the relearn strategies (iDLG 3/30, DLG 2/30).
    default_adaptive_strategy = "joint"
    takes_turns = False  # L-BFGS moves every coordinate at once

    def _optimize(self, target, initial, target_values, fixed_labels, progress, monitor):
        batched = self._batched_value_and_gradients(target)
        arguments = (target_values, fixed_labels, self._model_tensors(target))
        if self.config.optimizer == "tfp":
            return self._run_chunks(target, self._tfp_chunks(target, batched, initial, arguments), progress, monitor)
        positions, _, history, stats = self._run_chunks(
            target, self._torch_chunks(target, batched, initial, arguments), progress, monitor
        )
        # The state's losses are those of the last evaluated points, one step behind the positions.
        return positions, batched(tf.constant(positions), *arguments)[0].numpy().tolist(), history, stats

    def _minimize(self, batched, arguments, **options):
        """tfp's lbfgs_minimize of the batched objective with this attack's settings."""
        import tensorflow_probability as tfp  # here: the other attacks' runs skip its import (0.4 s)

        return tfp.optimizer.lbfgs_minimize(
            lambda positions: batched(positions, *arguments),
            num_correction_pairs=self.config.history_size,
            tolerance=0.0,
            x_tolerance=0.0,
            f_relative_tolerance=0.0,
            max_line_search_iterations=25,
            **options,
        )

    def _tfp_chunks(self, target, batched, initial, arguments):
        """`advance` for `_run_chunks`: tfp's lbfgs_minimize continued from its previous results."""
        # eager: one evaluation, nothing to compile
        state = self._minimize(batched, arguments, initial_position=initial, max_iterations=0)
        resume = self._shared_function(
            target,
            "tfp",
            lambda: tf.function(
                autograph=False,
                func=lambda state, until, arguments: self._minimize(
                    batched, arguments, initial_position=None, previous_optimizer_results=state, max_iterations=until
                ),
            ),
        )
        resume(state, tf.constant(0), arguments)  # compiles before the timed chunks
        position = initial

        def advance():
            nonlocal state, position
            until = min(int(state.num_iterations) + self.config.chunk, self.config.iterations)
            state = resume(state, tf.constant(until), arguments)
            # A problem whose line search failed reports its last finite position.
            finite = tf.reduce_all(tf.math.is_finite(state.position), axis=1) & tf.math.is_finite(state.objective_value)
            position = tf.where(finite[:, None], state.position, position)
            return (
                int(state.num_iterations),
                position,
                state.objective_value,
                int(state.num_objective_evaluations),
                bool(tf.reduce_all(state.converged | state.failed)),
            )

        return advance

    def _torch_chunks(self, target, batched, initial, arguments):
        """`advance` for `_run_chunks`: `chunk` evaluations of `lbfgs.TorchLBFGS` per call."""
        optimizer = lbfgs.TorchLBFGS(history_size=self.config.history_size)
        iterations = self.config.iterations
        run = self._shared_function(
            target,
            "torch",
            lambda: tf.function(
                autograph=False,
                func=lambda state, evaluations, arguments: optimizer.advance(
                    lambda positions: batched(positions, *arguments), state, evaluations, iterations
                ),
            ),
        )
        state = optimizer.initial_state(initial)
        run(state, tf.constant(0), arguments)  # compiles before the timed chunks
        chunk = tf.constant(self.config.chunk)

        def advance():
            nonlocal state
            state = run(state, chunk, arguments)
            return (
                int(tf.reduce_min(state.steps)),
                state.position,
                state.loss,
                int(tf.reduce_max(state.evaluations)),
                False,
            )

        return advance


class IDLG(DLG):
    """iDLG: DLG with the labels recovered analytically from the last layer (`IDLGConfig`)."""

    name = "idlg"
    Config = IDLGConfig
