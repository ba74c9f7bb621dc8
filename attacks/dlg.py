"""DLG (Zhu et al. 2019) and iDLG (Zhao et al. 2020): L2 gradient matching with L-BFGS.

DLG optimises the image and soft label logits jointly; iDLG fixes the label analytically first.
L-BFGS is tfp's `lbfgs_minimize` on the batch of independent problems (one per image and restart);
it needs DLG-like evaluation counts (thousands), so `iterations` is large by default.
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from attacks import base


class DLG(base.Attack):
    """DLG: `distance` between the candidate's and the captured gradient/update, L-BFGS.

    Args (beyond `base.Attack`):
      iterations: L-BFGS iterations (each several objective evaluations) in total.
      chunk: iterations per compiled call, between progress reports.
      distance: 'l2' (DLG) or 'cosine'.
      tv: weight of a total-variation prior (0 in DLG).
      history_size: L-BFGS correction pairs (PyTorch's default 100).
    """
    name = "dlg"

    def __init__(self, attacker, iterations=1000, chunk=250, distance="l2", tv=0.0, history_size=100,
                 label_mode="joint", restarts=1, seed=0):
        super().__init__(attacker, label_mode, restarts, seed)
        if distance not in base.DISTANCES:
            raise ValueError(f"distance must be one of {base.DISTANCES}, got {distance!r}")
        self.iterations, self.chunk, self.distance = int(iterations), int(chunk), distance
        self.tv, self.history_size = float(tv), int(history_size)

    def objective(self, position, target_values, fixed_labels, target):
        images, predicted = self._candidate(position, target_values, fixed_labels, target)
        loss = base.gradient_distance(predicted, target_values, self.distance)
        if self.tv:
            loss += self.tv * base.total_variation(images)
        return loss

    def _optimize(self, target, initial, target_values, fixed_labels, progress):
        value_and_gradients = self._batched_value_and_gradients(target)

        @tf.function
        def run(position, iterations):
            result = tfp.optimizer.lbfgs_minimize(
                lambda p: value_and_gradients(p, target_values, fixed_labels), initial_position=position,
                num_correction_pairs=self.history_size, tolerance=0.0, x_tolerance=0.0,
                f_relative_tolerance=0.0, max_iterations=iterations, max_line_search_iterations=25)
            return result.position, result.objective_value, result.num_objective_evaluations

        position, history, evaluations, done = initial, [], 0, 0
        while done < self.iterations:
            step = min(self.chunk, self.iterations - done)
            candidate, values, count = run(position, tf.constant(step))
            # A problem whose line search failed keeps its last finite position.
            finite = tf.reduce_all(tf.math.is_finite(candidate), axis=1) & tf.math.is_finite(values)
            position = tf.where(finite[:, None], candidate, position)
            done += step
            evaluations += int(count)
            losses = value_and_gradients(position, target_values, fixed_labels)[0].numpy()
            history.append({"iteration": done, "evaluations": evaluations, "loss": np.nan_to_num(losses, nan=np.inf).tolist()})
            if progress:
                progress(done, self.iterations, losses)
        return position.numpy(), history[-1]["loss"], history, {"iterations": done, "evaluations": evaluations}


class IDLG(DLG):
    """iDLG: DLG with the labels recovered analytically from the last layer."""
    name = "idlg"

    def __init__(self, attacker, **kwargs):
        kwargs.setdefault("label_mode", "infer")
        super().__init__(attacker, **kwargs)
