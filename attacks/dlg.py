"""DLG (Zhu et al. 2019) and iDLG (Zhao et al. 2020): L2 gradient matching with L-BFGS.

DLG optimises the image and soft label logits jointly; iDLG fixes the label analytically first.
L-BFGS runs on the batch of independent problems (one per image and restart), either tfp's
`lbfgs_minimize` (Hager-Zhang line search; it needs DLG-like evaluation counts, thousands, so
`iterations` is large by default) or `attacks.lbfgs.TorchLBFGS` (torch.optim.LBFGS with lr 1 and no
line search, the original DLG's optimiser). Either resumes from its full state after each chunk, so
chunking changes only where progress is reported, not the path.
"""

import functools

import tensorflow as tf
import tensorflow_probability as tfp

from attacks import base, lbfgs
from attacks.model import AttackerModel

OPTIMIZERS = ("tfp", "torch")


class DLG(base.Attack):
    """DLG: `distance` between the candidate's and the captured gradient/update, L-BFGS.

    Args (beyond `base.Attack`):
      iterations: in total, L-BFGS iterations (optimizer 'tfp', each several objective evaluations)
        or torch L-BFGS steps (optimizer 'torch', up to 20 evaluations each; the original DLG runs 300).
      chunk: per compiled call, between progress reports: iterations ('tfp') or objective
        evaluations ('torch').
      distance: 'l2' (DLG's, normalised), 'l2_sum' (DLG's as written) or 'cosine'.
      tv: weight of a total-variation prior (0 in DLG).
      history_size: L-BFGS correction pairs (PyTorch's default 100).
      optimizer: 'tfp' or 'torch' (see the module docstring).
    """

    name = "dlg"
    # Measured (benchmarks.adaptive_attacker, 30 images): the L-BFGS attacks do best from 'joint''s starts
    # (iDLG 9/30, DLG 3/30) and worse with the relearn strategies (iDLG 3/30, DLG 2/30).
    default_adaptive_strategy = "joint"
    takes_turns = False  # L-BFGS moves every coordinate at once

    def __init__(
        self,
        attacker: AttackerModel,
        iterations: int = 1000,
        chunk: int = 250,
        distance: str = "l2",
        tv: float = 0.0,
        history_size: int = 100,
        optimizer: str = "tfp",
        label_mode: str = "joint",
        restarts: int = 1,
        seed: int = 0,
        label_hypotheses: int = 1,
        adaptive_strategy: str | None = None,
    ) -> None:
        super().__init__(attacker, label_mode, restarts, seed, label_hypotheses, adaptive_strategy)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.iterations, self.chunk, self.distance = int(iterations), int(chunk), base.check_distance(distance)
        self.tv, self.history_size, self.optimizer = float(tv), int(history_size), optimizer

    def _optimize(self, target, initial, target_values, fixed_labels, progress, monitor):
        batched = self._batched_value_and_gradients(target)
        objective = lambda positions: batched(positions, target_values, fixed_labels)  # noqa: E731
        if self.optimizer == "tfp":
            return self._run_chunks(target, self._tfp_chunks(objective, initial), progress, monitor)
        positions, _, history, stats = self._run_chunks(
            target, self._torch_chunks(objective, initial), progress, monitor
        )
        # The state's losses are those of the last evaluated points, one step behind the positions.
        return positions, objective(tf.constant(positions))[0].numpy().tolist(), history, stats

    def _tfp_chunks(self, objective, initial):
        """`advance` for `_run_chunks`: tfp's lbfgs_minimize continued from its previous results."""
        minimize = functools.partial(
            tfp.optimizer.lbfgs_minimize,
            objective,
            num_correction_pairs=self.history_size,
            tolerance=0.0,
            x_tolerance=0.0,
            f_relative_tolerance=0.0,
            max_line_search_iterations=25,
        )
        state = minimize(initial_position=initial, max_iterations=0)  # eager: one evaluation, nothing to compile
        resume = tf.function(
            lambda state, until: minimize(initial_position=None, previous_optimizer_results=state, max_iterations=until)
        )
        resume(state, tf.constant(0))  # compiles before the timed chunks
        position = initial

        def advance():
            nonlocal state, position
            state = resume(state, tf.constant(min(int(state.num_iterations) + self.chunk, self.iterations)))
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

    def _torch_chunks(self, objective, initial):
        """`advance` for `_run_chunks`: `chunk` evaluations of `lbfgs.TorchLBFGS` per call."""
        optimizer = lbfgs.TorchLBFGS(history_size=self.history_size)
        run = tf.function(lambda state, evaluations: optimizer.advance(objective, state, evaluations, self.iterations))
        state = optimizer.initial_state(initial)
        run(state, tf.constant(0))  # compiles before the timed chunks
        chunk = tf.constant(self.chunk)

        def advance():
            nonlocal state
            state = run(state, chunk)
            return (
                int(tf.reduce_min(state.steps)),
                state.position,
                state.loss,
                int(tf.reduce_max(state.evaluations)),
                False,
            )

        return advance


class IDLG(DLG):
    """iDLG: DLG with the labels recovered analytically from the last layer."""

    name = "idlg"

    def __init__(self, attacker: AttackerModel, **kwargs) -> None:
        kwargs.setdefault("label_mode", "infer")
        super().__init__(attacker, **kwargs)
