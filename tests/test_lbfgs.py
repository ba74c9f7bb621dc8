"""attacks.lbfgs.TorchLBFGS: torch.optim.LBFGS's iterates without torch, batched and resumable."""

import numpy as np
import tensorflow as tf

from attacks import lbfgs

# The points torch 2.13's LBFGS(lr=1, max_iter=4, history_size=2) evaluates in 12 steps of the problem
# below (history drops, full steps and steps ended by the tolerances, re-evaluating their last point):
#   .venv-torch/bin/python -m experiments.perf.torch_side.lbfgs_trajectory
TORCH_EVALUATED = [
    [1.5, -2.0, 0.7, 3.0],
    [1.29568, -1.80913, 0.295413, 2.799778],
    [-3.335066, 0.74015, -11.718707, -7.197268],
    [-4.103141, -1.846428, -7.172417, -4.59182],
    [-2.455961, -1.873562, -2.672959, -0.523571],
    [0.332557, -0.71999, 2.033204, -1.14352],
    [-1.60687, -0.916961, -1.789957, -1.818905],
    [-1.495378, -0.876628, -1.484007, -1.604025],
    [-1.286021, -0.856755, -1.207814, -1.246562],
    [-1.313066, -0.855063, -1.32304, -1.307389],
    [-1.308634, -0.869431, -1.32036, -1.292373],
    [-1.302384, -0.891411, -1.331413, -1.274345],
    [-1.297225, -0.896691, -1.342818, -1.26719],
    [-1.297783, -0.897684, -1.342966, -1.268561],
    [-1.297547, -0.897708, -1.342914, -1.268694],
    [-1.297547, -0.897708, -1.342914, -1.268694],
] + [[-1.297444, -0.897714, -1.342922, -1.268761]] * 8
A = tf.constant([[1.0, 2.0, -1.0, 0.5], [0.3, -1.0, 2.0, 1.0], [2.0, 0.1, 0.4, -0.7]])
B = tf.constant([0.5, -1.0, 2.0])


def _problem(positions):
    """Per row: sum softplus(A x - b) + 0.05 |x|^2 + 0.1 sum sin(x), and its gradient."""
    with tf.GradientTape() as tape:
        tape.watch(positions)
        values = (
            tf.reduce_sum(tf.nn.softplus(tf.linalg.matvec(A, positions) - B), 1)
            + 0.05 * tf.reduce_sum(tf.square(positions), 1)
            + 0.1 * tf.reduce_sum(tf.sin(positions), 1)
        )
    return values, tape.gradient(values, positions)


def _run(optimizer, start, chunk, steps):
    """Runs `steps` steps in chunks of `chunk` evaluations; returns the final state and the points
    the state held before each chunk."""
    advance = tf.function(lambda state: optimizer.advance(_problem, state, chunk, steps))
    state, points = optimizer.initial_state(start), []
    while np.any(state.steps.numpy() < steps):
        points.append(state.position.numpy())
        state = advance(state)
    return state, points


def test_follows_torchs_iterates_one_evaluation_at_a_time():
    optimizer = lbfgs.TorchLBFGS(lr=1.0, max_iter=4, history_size=2)
    state, points = _run(optimizer, tf.constant([TORCH_EVALUATED[0]]), 1, 12)
    assert int(state.evaluations[0]) == len(TORCH_EVALUATED) == len(points)
    np.testing.assert_allclose(np.concatenate(points), TORCH_EVALUATED, atol=2e-4)
    np.testing.assert_allclose(state.position[0], TORCH_EVALUATED[-1], atol=2e-5)


def test_problems_are_independent_and_chunks_do_not_change_the_path():
    optimizer = lbfgs.TorchLBFGS(max_iter=5, history_size=3)
    start = [1.5, -2.0, 0.7, 3.0]
    together, _ = _run(optimizer, tf.constant([start, [-0.5, 0.2, 1.0, 0.0]]), 1000, 8)
    other, _ = _run(optimizer, tf.constant([start, [2.0, 2.0, -1.0, 0.5]]), 7, 8)
    np.testing.assert_array_equal(other.position[0], together.position[0])
    assert int(other.evaluations[0]) == int(together.evaluations[0])


def test_minimises_an_ill_conditioned_quadratic():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((20, 20)))[0]
    hessian = tf.constant(basis @ np.diag(np.logspace(0, 2, 20)) @ basis.T, tf.float32)
    optimum = tf.constant(rng.standard_normal((1, 20)), tf.float32)

    def quadratic(positions):
        delta = positions - optimum
        return 0.5 * tf.reduce_sum(delta * tf.matmul(delta, hessian), 1), tf.matmul(delta, hessian)

    optimizer = lbfgs.TorchLBFGS()
    state = tf.function(optimizer.advance)(quadratic, optimizer.initial_state(tf.zeros((1, 20))), 500, 25)
    np.testing.assert_allclose(state.position, optimum, atol=1e-3)
