"""torch.optim.LBFGS without line search (the original DLG's optimiser), in TensorFlow.

Batched over independent problems (positions [P, n]). Each problem follows torch's `step()` rules
exactly: a step evaluates the objective, then runs up to `max_iter` iterations of a fixed step `lr`
along the L-BFGS direction (the first iteration of all scaled by min(1, 1/|g|_1)), one evaluation
each except after the last; it ends early on torch's tolerances (max|g| <= tolerance_grad,
g.d > -tolerance_change, max|t d| <= tolerance_change, |f - f_prev| < tolerance_change, max_eval),
and the next step re-evaluates where it stopped. History (up to `history_size` pairs, pairs with
y.s <= 1e-10 skipped) and step state carry over between steps, as in torch.

`advance` runs a given number of objective evaluations in one `tf.while_loop` and returns the full
state, so a caller can stop between any two evaluations and resume on exactly the same path. The
two-loop recursion is computed as two triangular solves on the pairs' S.Y products (kept up to
date incrementally): the same recursion, in a few matrix operations instead of 2 x history_size
sequential ones.
"""

import typing

import tensorflow as tf


class State(typing.NamedTuple):
    """Per problem: the next point to evaluate and torch's LBFGS state (history oldest first)."""

    position: tf.Tensor  # [P, n]
    loss: tf.Tensor  # [P] at the last evaluated point
    direction: tf.Tensor  # [P, n] d
    step_length: tf.Tensor  # [P] t
    previous_gradient: tf.Tensor  # [P, n]
    previous_loss: tf.Tensor  # [P]
    steps_s: tf.Tensor  # [P, m, n] s pairs
    steps_y: tf.Tensor  # [P, m, n] y pairs
    rho: tf.Tensor  # [P, m] 1 / (y.s), 0 for empty slots
    s_dot_y: tf.Tensor  # [P, m, m] s_i . y_j
    hessian_diagonal: tf.Tensor  # [P] H_diag
    iterations: tf.Tensor  # [P] torch's state['n_iter']
    step_iterations: tf.Tensor  # [P] n_iter within the current step
    step_evaluations: tf.Tensor  # [P] current_evals within the current step
    step_start: tf.Tensor  # [P] the next evaluation begins a step
    steps: tf.Tensor  # [P] completed steps
    evaluations: tf.Tensor  # [P] torch's state['func_evals']


class TorchLBFGS:
    """torch.optim.LBFGS(lr, max_iter, max_eval, tolerance_grad, tolerance_change, history_size,
    line_search_fn=None), same defaults."""

    def __init__(
        self, lr=1.0, max_iter=20, max_eval=None, tolerance_grad=1e-7, tolerance_change=1e-9, history_size=100
    ):
        if lr <= 0 or max_iter < 1 or history_size < 1:
            raise ValueError("lr, max_iter and history_size must be positive")
        self.lr, self.max_iter = float(lr), int(max_iter)
        self.max_eval = int(max_eval) if max_eval is not None else self.max_iter * 5 // 4
        self.tolerance_grad, self.tolerance_change = float(tolerance_grad), float(tolerance_change)
        self.history_size = int(history_size)

    def initial_state(self, position):
        """The state before the first `step()` at `position` [P, n]."""
        position = tf.convert_to_tensor(position, tf.float32)
        problems, size, m = tf.shape(position)[0], tf.shape(position)[1], self.history_size
        zeros, counts = tf.zeros([problems]), tf.zeros([problems], tf.int32)
        pairs = tf.zeros([problems, m, size])
        return State(
            position,
            zeros,
            tf.zeros_like(position),
            zeros,
            tf.zeros_like(position),
            zeros,
            pairs,
            pairs,
            tf.zeros([problems, m]),
            tf.zeros([problems, m, m]),
            tf.ones([problems]),
            counts,
            counts,
            counts,
            tf.ones([problems], tf.bool),
            counts,
            counts,
        )

    def advance(self, value_and_gradients, state, evaluations, max_steps):
        """Runs `evaluations` batched objective evaluations (fewer once every problem has completed
        `max_steps` steps or stopped on a non-finite objective). Graph code: call it inside tf.function."""

        def body(count, state):
            loss, gradient = value_and_gradients(state.position)
            return count + 1, self._after_evaluation(state, loss, gradient, max_steps)

        def more(count, state):
            return (count < evaluations) & tf.reduce_any(state.steps < max_steps)

        return tf.while_loop(more, body, (tf.constant(0), state))[1]

    def _after_evaluation(self, state, loss, gradient, max_steps):
        """torch's logic between two evaluations: the checks that end a step, then one iteration."""
        finite = tf.math.is_finite(loss) & tf.reduce_all(tf.math.is_finite(gradient), axis=1)
        live = state.steps < max_steps
        starting = live & state.step_start
        in_step = live & ~state.step_start
        step_evaluations = tf.where(starting, 1, state.step_evaluations + tf.cast(in_step, tf.int32))
        step_iterations = tf.where(starting, 0, state.step_iterations)
        optimal = tf.reduce_max(tf.abs(gradient), axis=1) <= self.tolerance_grad
        no_progress = (
            (step_evaluations >= self.max_eval)
            | optimal
            | (tf.reduce_max(tf.abs(state.direction * state.step_length[:, None]), axis=1) <= self.tolerance_change)
            | (tf.abs(tf.cast(loss, tf.float64) - tf.cast(state.previous_loss, tf.float64)) < self.tolerance_change)
        )
        ends = (starting & optimal) | (in_step & no_progress)
        iterate = live & finite & ~ends

        iterations = state.iterations + tf.cast(iterate, tf.int32)
        step_iterations += tf.cast(iterate, tf.int32)
        first = iterations == 1
        y = gradient - state.previous_gradient
        s = state.direction * state.step_length[:, None]
        ys = tf.reduce_sum(y * s, axis=1)
        push = iterate & ~first & (ys > 1e-10)
        history = self._push(state, push, s, y, ys)
        hessian_diagonal = tf.where(push, ys / tf.reduce_sum(y * y, axis=1), state.hessian_diagonal)
        direction = tf.where(first[:, None], -gradient, self._two_loop(-gradient, *history, hessian_diagonal))
        direction = tf.where(iterate[:, None], direction, state.direction)
        step_length = tf.where(first, tf.minimum(1.0, 1.0 / tf.reduce_sum(tf.abs(gradient), axis=1)) * self.lr, self.lr)
        step_length = tf.where(iterate, step_length, state.step_length)
        descends = tf.reduce_sum(gradient * direction, axis=1) <= -self.tolerance_change
        moves = iterate & descends
        position = tf.where(moves[:, None], state.position + step_length[:, None] * direction, state.position)
        step_ends = live & (ends | (iterate & ~descends) | (moves & (step_iterations == self.max_iter)))
        return State(
            position,
            tf.where(live, loss, state.loss),
            direction,
            step_length,
            tf.where(iterate[:, None], gradient, state.previous_gradient),
            tf.where(iterate, loss, state.previous_loss),
            *history,
            hessian_diagonal,
            iterations,
            step_iterations,
            step_evaluations,
            tf.where(live, step_ends, state.step_start),
            tf.where(live & ~finite, max_steps, state.steps + tf.cast(step_ends, tf.int32)),
            state.evaluations + tf.cast(live, tf.int32),
        )

    @staticmethod
    def _push(state, push, s, y, ys):
        """Appends (s, y) as the newest pair where `push`, dropping the oldest; keeps s_i . y_j."""
        steps_s = tf.concat([state.steps_s[:, 1:], s[:, None]], axis=1)
        steps_y = tf.concat([state.steps_y[:, 1:], y[:, None]], axis=1)
        rho = tf.concat([state.rho[:, 1:], (1.0 / ys)[:, None]], axis=1)
        new_column = tf.einsum("pmn,pn->pm", steps_s, y)  # s_i . y_new
        new_row = tf.einsum("pmn,pn->pm", steps_y, s)  # s_new . y_j
        s_dot_y = tf.concat(
            [tf.concat([state.s_dot_y[:, 1:, 1:], new_column[:, :-1, None]], axis=2), new_row[:, None]], axis=1
        )
        keep = lambda new, old: tf.where(tf.reshape(push, [-1] + [1] * (old.shape.rank - 1)), new, old)  # noqa: E731
        return (
            keep(steps_s, state.steps_s),
            keep(steps_y, state.steps_y),
            keep(rho, state.rho),
            keep(s_dot_y, state.s_dot_y),
        )

    @staticmethod
    def _two_loop(q, steps_s, steps_y, rho, s_dot_y, hessian_diagonal):
        """torch's two-loop recursion from q = -g. First loop (newest to oldest):
        a_i = rho_i s_i.(q - sum_{j>i} a_j y_j); second (oldest to newest): c_i = a_i - rho_i y_i.r_i with
        r_i = H q' + sum_{j<i} c_j s_j. Both are triangular systems in the s_i . y_j products."""
        eye = tf.eye(tf.shape(rho)[1], batch_shape=tf.shape(rho)[:1])
        upper = eye + rho[:, :, None] * tf.linalg.band_part(s_dot_y, 0, -1) * (1.0 - eye)
        alpha = tf.linalg.triangular_solve(upper, (rho * tf.einsum("pmn,pn->pm", steps_s, q))[:, :, None], lower=False)[
            :, :, 0
        ]
        r = hessian_diagonal[:, None] * (q - tf.einsum("pmn,pm->pn", steps_y, alpha))
        lower = eye + rho[:, :, None] * tf.linalg.band_part(tf.linalg.matrix_transpose(s_dot_y), -1, 0) * (1.0 - eye)
        c = tf.linalg.triangular_solve(
            lower, (alpha - rho * tf.einsum("pmn,pn->pm", steps_y, r))[:, :, None], lower=True
        )[:, :, 0]
        return r + tf.einsum("pmn,pm->pn", steps_s, c)
