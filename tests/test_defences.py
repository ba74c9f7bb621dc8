"""Defences in the federated process: DP-FedAvg (TFF's aggregator), update pruning, FedKL on every layer."""

import numpy as np
import pytest
import tensorflow as tf

# `context` is test_federated's autouse fixture (TFF's execution context), imported to apply here too.
from tests.test_federated import KEY_DIM, _contains, context, digits_subset, make_config  # noqa: F401
import tfkl
from tfkl.federated import algorithms, client_data, program, run_dir
from tfkl.federated.config import ProgramError, build_process


@pytest.fixture(scope="module")
def digits():
    return digits_subset(60, 20, seed=1)


def _train(root_dir, config, digits, rounds=1):
    program.train(str(root_dir), config, program.RunOptions(rounds=rounds, progress=False), dataset=digits)
    return run_dir.restore(str(root_dir), config, build_process(config))


def _global(server_state):
    return np.concatenate([np.ravel(w) for w in server_state["trainable"]])


def test_dp_aggregator_state_noise_and_clip(digits, tmp_path):
    dp = dict(algorithm="fedavg", client_weighting="uniform", dp_clip=0.05)
    initial = _global(build_process(make_config(**dp)).initialize())
    states = {}
    for noise in (0.0, 0.5):
        config = make_config(**dp, dp_noise_multiplier=noise)
        process = build_process(config)
        assert hasattr(process.state_type.member, "aggregator")
        server_state, _, round_num = _train(tmp_path / f"noise_{noise}", config, digits)
        assert round_num == 1 and "aggregator" in server_state
        states[noise] = _global(server_state)
    # The mean of updates clipped to 0.05 moves the (SGD 1.0) server by at most 0.05.
    assert 0 < np.linalg.norm(states[0.0] - initial) <= 0.05 + 1e-6
    assert np.linalg.norm(states[0.5] - states[0.0]) > 1e-3
    with pytest.raises(ProgramError, match="uniform"):
        build_process(make_config(algorithm="fedavg", dp_clip=0.05))


def test_dp_run_resumes(digits, tmp_path):
    config = make_config(algorithm="fedavg", client_weighting="uniform", dp_clip=1.0, dp_noise_multiplier=0.1)
    _train(tmp_path, config, digits, rounds=1)
    server_state, _, round_num = _train(tmp_path, config, digits, rounds=2)
    assert round_num == 2 and int(server_state["round_num"]) == 2


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_prune_smallest_zeroes_exactly_the_fraction(fraction):
    rng = np.random.default_rng(0)
    update = {"a": rng.standard_normal((7, 13)).astype(np.float32), "b": rng.standard_normal(300).astype(np.float32)}
    pruned = algorithms.prune_smallest(fraction)(tf.nest.map_structure(tf.constant, update))
    for name, value in update.items():
        kept = pruned[name].numpy()
        assert (kept == 0).sum() == round(fraction * value.size)
        survivors = np.abs(value[kept != 0])
        assert survivors.min() >= np.abs(value[kept == 0]).max()
        np.testing.assert_array_equal(kept[kept != 0], value[kept != 0])


def test_pruned_updates_reach_the_server(digits, tmp_path):
    config = make_config(algorithm="fedavg", prune_fraction=0.9)
    process = build_process(config, return_client_updates=True)
    server_state = process.initialize()
    dataset = client_data.client_dataset(config, digits, np.arange(20), 0)
    _, _, _, reports = process.next(server_state, np.float32(0.05), [dataset], [process.initial_client_state()])
    for value in reports[0]["update"]["trainable"]:
        assert (np.asarray(value) == 0).sum() == round(0.9 * np.size(value))


def test_every_lock_stays_private(digits, tmp_path):
    config = make_config(lock_where="all")
    model = config.model_fn()()
    locks = tfkl.private.lock_layers(model)
    assert len(locks) == 3
    process = build_process(config)
    assert len(process.client_state_type.lock) == 4 * len(locks) and len(process.client_state_type.key) == 1
    server_state, client_states, _ = _train(tmp_path, config, digits, rounds=2)
    server_arrays = [np.asarray(a) for a in tf.nest.flatten(server_state)]
    initial_lock = [v.numpy() for v in process.parts.split(model)[3]]
    for state in client_states.values():
        assert len(state["lock"]) == 4 * len(locks)
        for secret, start in zip(state["key"] + state["lock"], [None] + initial_lock):
            assert not _contains(secret, server_arrays)
            if start is not None:  # every lock trained and kept by the client
                assert not np.array_equal(secret, start)
    # The server state holds exactly the shared variables: no lock's weights.
    shared_shapes = sorted(tuple(v.shape) for v in tfkl.shared_variables(model))
    assert sorted(np.shape(a) for a in server_state["trainable"] + server_state["non_trainable"]) == shared_shapes
    assert (KEY_DIM, 12) not in shared_shapes


def test_a_spatial_lock_stays_private(digits, tmp_path):
    config = make_config(lock_affine="spatial")
    model = config.model_fn()()
    (lock,) = tfkl.private.lock_layers(model)
    assert lock.scale_kernel.shape == (KEY_DIM, 8 * 8 * 12)  # conv1 (stride 2) of 16x16 inputs
    server_state, client_states, _ = _train(tmp_path, config, digits, rounds=1)
    server_arrays = [np.asarray(a) for a in tf.nest.flatten(server_state)]
    for state in client_states.values():
        assert [np.shape(a) for a in state["lock"]] == [(KEY_DIM, 768), (768,)] * 2
        for secret in state["key"] + state["lock"]:
            # 12,288 float32 lock values meet a few equal values among the shared weights by chance
            # (~1 per array): a leak would put the secret's values there, not one in a thousand.
            values = np.asarray(secret).ravel()
            assert max(np.isin(values, a.ravel()).mean() for a in server_arrays) < 1e-3
    shared_shapes = sorted(tuple(v.shape) for v in tfkl.shared_variables(model))
    assert sorted(np.shape(a) for a in server_state["trainable"] + server_state["non_trainable"]) == shared_shapes
