"""KeyLock(kernel='compact'): the full form's arithmetic (forward, TorchSGD training, any key) with a
private state of the affine size."""

import collections

import numpy as np
import pytest
import tensorflow as tf

import tfkl
from tfkl import models, optimizers, private
from tfkl.federated import client_work
from tfkl.federated.config import Config, ConfigError
from tfkl.keylock import COMPACT_LOCK_WEIGHT_NAMES, KeyLock

SHAPE = (6, 6, 2)
KEY_DIM = 16
TOLERANCE = 1e-5


def _locked_model(kernel, affine="spatial", activation="relu", normalization="batch", seed=0):
    """Conv -> KeyLock -> dense with seeded weights (equal for both kernels) and a seeded key."""
    seeded = lambda s: tf.keras.initializers.GlorotUniform(seed=seed + s)  # noqa: E731
    inputs = tf.keras.Input(SHAPE)
    x = tf.keras.layers.Conv2D(3, 3, kernel_initializer=seeded(1), bias_initializer=seeded(2))(inputs)
    x = KeyLock(
        KEY_DIM,
        activation,
        normalization,
        key=tfkl.generate_key(KEY_DIM, seed=seed),
        affine=affine,
        kernel=kernel,
        name="lock",
    )(x)
    x = tf.keras.layers.Flatten()(tf.keras.layers.Activation("sigmoid")(x))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, kernel_initializer=seeded(4))(x))


def _pair(**options):
    """(full, compact) models with the same weights: the full lock holds the compact one's kernels."""
    full, compact = _locked_model("full", **options), _locked_model("compact", **options)
    full_lock, compact_lock = full.get_layer("lock"), compact.get_layer("lock")
    for variable, value in zip(full_lock.lock_weights, compact_lock.materialized_kernels()):
        variable.assign(value)
    return full, compact


def _batches(count, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((5,) + SHAPE).astype(np.float32), rng.integers(0, 3, 5).astype(np.int64))
        for _ in range(count)
    ]


def _train(model, optimizer, batches):
    """TorchSGD steps as the clients take them; returns the momentum buffers."""
    variables = model.trainable_variables
    state = optimizer.initialize([tf.TensorSpec(v.shape, v.dtype) for v in variables])
    loss_fn = tfkl.training.classification_loss()

    @tf.function
    def step(images, labels, state):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        state, new = optimizer.next(state, [v.read_value() for v in variables], tape.gradient(loss, variables))
        for variable, value in zip(variables, new):
            variable.assign(value)
        return state

    for images, labels in batches:
        state = step(images, labels, state)
    return state


def _max_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


@pytest.mark.parametrize("affine", ["channel", "spatial"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_equals_the_full_form(affine, activation, training):
    full, compact = _pair(affine=affine, activation=activation)
    images, _ = _batches(1)[0]
    assert _max_difference([full(images, training=training)], [compact(images, training=training)]) < TOLERANCE
    full_lock, compact_lock = full.get_layer("lock"), compact.get_layer("lock")
    assert _max_difference(full_lock.lock_parameters(), compact_lock.lock_parameters()) < TOLERANCE


@pytest.mark.parametrize("nesterov, weight_decay", [(True, 5e-4), (False, 5e-4), (True, 0.05), (False, 0.0)])
def test_torch_sgd_trains_the_compact_lock_as_the_full_kernels(nesterov, weight_decay):
    full, compact = _pair()
    optimizer = optimizers.TorchSGD(0.1, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    batches = _batches(6)
    _train(full, optimizer, batches)
    _train(compact, optimizer, batches)
    full_lock, compact_lock = full.get_layer("lock"), compact.get_layer("lock")
    kernels = compact_lock.materialized_kernels()
    moved = _max_difference(kernels, _pair()[1].get_layer("lock").materialized_kernels())
    assert moved > 1e-3  # the lock trained
    assert _max_difference(full_lock.lock_weights, kernels) < TOLERANCE
    shared = [private.shared_variables(m) for m in (full, compact)]
    assert _max_difference(*shared) < TOLERANCE
    images, _ = _batches(1, seed=1)[0]
    for training in (True, False):
        assert _max_difference([full(images, training=training)], [compact(images, training=training)]) < TOLERANCE
    np.testing.assert_array_equal(compact_lock.lock_key.numpy(), compact_lock.key.numpy())


def test_random_keys_evaluate_as_with_the_full_kernels():
    full, compact = _pair()
    optimizer = optimizers.TorchSGD(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    batches = _batches(4)
    _train(full, optimizer, batches)
    _train(compact, optimizer, batches)
    images, _ = _batches(1, seed=2)[0]
    full_lock, compact_lock = full.get_layer("lock"), compact.get_layer("lock")
    for seed in (7, 8):
        other = tfkl.generate_key(KEY_DIM, seed=seed)
        assert _max_difference(full_lock.lock_parameters(other), compact_lock.lock_parameters(other)) < TOLERANCE
        tfkl.set_key(full, other)
        tfkl.set_key(compact, other)
        assert _max_difference(full_lock.lock_parameters(), compact_lock.lock_parameters()) < TOLERANCE
        assert _max_difference([full(images)], [compact(images)]) < TOLERANCE
    # A trained compact lock trains under its own key only; its lock key stays that one.
    with pytest.raises(tf.errors.InvalidArgumentError, match="trains only under the key"):
        _train(compact, optimizer, batches[:1])


def test_gain_gets_a_zero_gradient_and_delta_the_projections():
    model = _locked_model("compact")
    lock = model.get_layer("lock")
    images, labels = _batches(1)[0]
    with tf.GradientTape() as tape:
        loss = tfkl.training.classification_loss()(labels, model(images, training=True))
    gains, deltas = tape.gradient(loss, [lock.gains, lock.deltas])
    assert gains is not None and not np.any(gains.numpy()) and np.abs(deltas.numpy()).max(axis=1).min() > 0


def _lenet(kernel, seed=0):
    return models.build("lenet", (32, 32, 1), 10, seed=seed, affine="spatial", kernel=kernel)


def test_private_state_of_a_spatial_lenet_client_is_under_a_megabyte():
    states = {}
    for kernel in ("full", "compact"):
        model = _lenet(kernel)
        state = client_work.initial_client_state(
            model, tfkl.generate_key(1024, seed=0), persist_optimizer_state=True, keep_statistics=True
        )
        states[kernel] = sum(np.asarray(a).nbytes for a in tf.nest.flatten(state))
        in_memory = sum(v.numpy().nbytes for v in tfkl.private_variables(model))
        if kernel == "compact":
            assert in_memory <= 2**20
    assert states["compact"] <= 2**20 < 25 * 2**20 < states["full"]


def test_private_state_round_trips_through_a_file(tmp_path):
    model = _lenet("compact", seed=1)
    key = tfkl.generate_key(1024, seed=3)
    tfkl.set_key(model, key)
    lock = private.lock_layers(model)[0]
    images = np.random.default_rng(0).random((4, 32, 32, 1)).astype(np.float32)
    _train(model, optimizers.TorchSGD(0.05), [(images, np.arange(4))])
    path = str(tmp_path / "private.npz")
    np.savez(path, *[v.numpy() for v in lock.private_weights])
    restored = _lenet("compact", seed=1)
    for variable, value in zip(private.shared_variables(restored), private.shared_variables(model)):
        variable.assign(value)
    with np.load(path) as arrays:
        for index, variable in enumerate(private.lock_layers(restored)[0].private_weights):
            variable.assign(arrays[f"arr_{index}"])
    assert _max_difference([model(images)], [restored(images)]) == 0.0
    assert _max_difference(lock.materialized_kernels(), private.lock_layers(restored)[0].materialized_kernels()) == 0


def test_private_lock_draws_fit_the_compact_lock_and_differ():
    model = _lenet("compact")
    lock = private.lock_layers(model)[0]
    drawn = private.draw_lock_weights(model)
    assert [w.shape for w in drawn] == [tuple(v.shape) for v in lock.lock_weights]
    assert all(w.dtype == np.float32 for w in drawn)
    assert not np.array_equal(drawn[0], private.draw_lock_weights(model)[0])
    np.testing.assert_array_equal(
        private.draw_lock_weights(model, seed=[1, 2])[0], private.draw_lock_weights(model, seed=[1, 2])[0]
    )
    before = [k.numpy() for k in lock.materialized_kernels()]
    for variable, value in zip(lock.lock_weights, drawn):
        variable.assign(value)
    after = [k.numpy() for k in lock.materialized_kernels()]
    low, high = lock.uniform_range()
    assert all(low <= a.min() and a.max() <= high for a in after)
    assert not any(np.array_equal(a, b) for a, b in zip(before, after))
    assert np.isfinite(model(np.zeros((2, 32, 32, 1), np.float32), training=True).numpy()).all()


def test_compact_lock_options_are_validated_and_configs_hold_no_secret():
    with pytest.raises(ValueError, match="kernel must be one of"):
        KeyLock(8, kernel="sparse")
    with pytest.raises(ValueError, match="uniform lock initialiser"):
        KeyLock(8, kernel="compact", lock_initializer="glorot_normal")
    model = _lenet("compact")
    lock = private.lock_layers(model)[0]
    config = lock.get_config()
    assert config["kernel"] == "compact" and "key" not in config and "lock_seed" not in str(config)
    clone = tf.keras.models.model_from_json(model.to_json())
    assert private.lock_layers(clone)[0].kernel == "compact"
    names = {v.name.split("/")[-1].split(":")[0] for v in lock.lock_weights}
    assert names == set(COMPACT_LOCK_WEIGHT_NAMES)
    shared = {id(v) for v in private.shared_variables(model)}
    assert not shared & {id(v) for v in lock.private_weights + lock.cache_weights}
    with pytest.raises(ConfigError, match="needs algorithm=fedkl"):
        Config(algorithm="fedavg", lock_kernel="compact")
    with pytest.raises(ConfigError, match="random_key_penalty needs lock_kernel=full"):
        Config(lock_kernel="compact", random_key_penalty=0.5)
    with pytest.raises(ConfigError, match="lock_kernel must be one of"):
        Config(lock_kernel="sparse")


def test_initial_kernels_are_pinned_to_the_seed():
    """A stored lock seed must give the same W0 later (a change in TF's Philox stream would show here)."""
    lock = KeyLock(4, kernel="compact", lock_initializer=tf.keras.initializers.RandomUniform(-1.0, 1.0))
    lock.build((None, 2))
    lock.lock_seed.assign([1.0, 2.0, 3.0, 4.0])
    initial = lock.initial_kernels().numpy()
    np.testing.assert_allclose(initial[0, 0], PINNED_ROW, atol=1e-6)
    assert initial.shape == (2, 4, 2) and np.abs(initial).max() <= 1.0


PINNED_ROW = [0.24640441, 0.9069302]


def test_load_shared_zero_lock_gives_zero_gamma_and_beta(tmp_path):
    model = _lenet("compact")
    tfkl.export_shared(model, str(tmp_path / "export"))
    loaded = tfkl.load_shared(str(tmp_path / "export"))
    gamma, beta = private.lock_layers(loaded)[0].lock_parameters()
    assert not np.any(gamma.numpy()) and not np.any(beta.numpy())


def test_client_update_with_a_compact_lock_equals_the_full_one():
    """One client round of plain TF client work (what the TFF round places): same update and lock."""
    full, compact = _pair()
    optimizer = optimizers.TorchSGD(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    key = tfkl.generate_key(KEY_DIM, seed=11)
    dataset = tf.data.Dataset.from_tensor_slices(tuple(np.concatenate(a) for a in zip(*_batches(3)))).batch(5)
    outputs = {}
    for name, model in (("full", full), ("compact", compact)):
        trainable, non_trainable, _, _ = client_work.ModelParts(model).split(model)
        weights = collections.OrderedDict(
            trainable=[v.numpy() for v in trainable], non_trainable=[v.numpy() for v in non_trainable]
        )
        state = client_work.initial_client_state(model, key, persist_optimizer_state=True, keep_statistics=False)
        outputs[name] = client_work.client_update(
            model, optimizer, weights, 0.1, dataset, state, weight_by_examples=True
        )
    assert _max_difference(tf.nest.flatten(outputs["full"].update), tf.nest.flatten(outputs["compact"].update)) < 1e-6
    compact_lock = compact.get_layer("lock")
    for variable, value in zip(compact_lock.lock_weights, outputs["compact"].client_state["lock"]):
        variable.assign(value)
    assert _max_difference(outputs["full"].client_state["lock"], compact_lock.materialized_kernels()) < TOLERANCE


@pytest.fixture
def tff_context():
    from tff_programs import contexts

    contexts.install_context()
    yield
    contexts.shutdown()


def test_fedkl_round_with_a_compact_spatial_lock_equals_the_full_one(tff_context):
    """A TFF FedKL round: the same server state and client lock (materialised) from both kernels."""
    from tfkl import data
    from tfkl.federated import algorithms

    shape, key_dim = (16, 16, 1), 16
    model_fns = {
        kernel: lambda kernel=kernel: models.build(
            "lenet", shape, 10, seed=3, key_dim=key_dim, affine="spatial", kernel=kernel
        )
        for kernel in ("full", "compact")
    }
    compact_model = model_fns["compact"]()
    initial_lock = [w.numpy() for w in private.lock_layers(compact_model)[0].materialized_kernels()]
    key = tfkl.generate_key(key_dim, seed=5)
    digits = data.load("digits")
    dataset = data.make_dataset(digits.x_train[:40], digits.y_train[:40], shape, 16)
    results = {}
    for kernel, model_fn in model_fns.items():
        process = algorithms.build_fedkl_process(model_fn, optimizers.TorchSGD(0.05))
        state = process.initial_client_state(key, initial_lock if kernel == "full" else None)
        results[kernel] = process.next(process.initialize(), np.float32(0.05), [dataset], [state])
    (full_server, full_states, _, _), (compact_server, compact_states, _, _) = results["full"], results["compact"]
    for part in ("trainable", "non_trainable"):
        assert _max_difference(full_server[part], compact_server[part]) < TOLERANCE
    lock = private.lock_layers(compact_model)[0]
    for variable, value in zip(lock.lock_weights, compact_states[0]["lock"]):
        variable.assign(value)
    np.testing.assert_array_equal(lock.lock_key.numpy(), key)
    assert _max_difference(full_states[0]["lock"], lock.materialized_kernels()) < TOLERANCE


def test_attacks_see_the_materialised_lock():
    """The oracle attacker, given a trained compact lock's secret, reproduces the client's gradient."""
    from attacks import cases, targets
    from attacks import model as attack_model

    victim = models.build("lenet", (8, 8, 1), 4, seed=3, key_dim=KEY_DIM, affine="spatial", kernel="compact")
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (2, 8, 8, 1)).astype(np.float32), rng.integers(0, 4, 2)
    _train(victim, optimizers.TorchSGD(0.1), [(x, y)])
    lock = private.lock_layers(victim)[0]
    secret = attack_model.extract_secret(victim)[lock.name]
    assert len(secret) == 5 and _max_difference(secret[1:], lock.materialized_kernels()) == 0
    target = cases.client_gradient(victim, x, y)
    view = attack_model.ServerView.from_model(victim)
    attacker = attack_model.AttackerModel(view, "oracle", secret=attack_model.extract_secret(victim))
    predicted = targets.simulate(attacker, target, tf.constant(x), tf.constant(y), tf.zeros([0]))
    assert _max_difference(predicted, target.values) < TOLERANCE


def test_the_lock_thief_of_a_compact_run_holds_a_full_lock_on_the_same_shared_weights():
    """Entry (e) of a compact run: the thief's full-kernel model, given the client's lock materialised, computes
    what the client's model computes; its own fresh lock is a full one."""
    from tfkl.federated import evaluation

    config = Config(model="lenet", dataset="digits", lock_affine="spatial", lock_kernel="compact", lock_noise=0.5)
    model = config.model_fn()()
    shared_t, shared_n, _, _ = client_work.ModelParts(model).split(model)
    rng = np.random.default_rng(1)  # shared weights that are not model_fn's: the thief must take the server's
    trainable = [v.numpy() + rng.normal(0, 0.05, v.shape).astype(np.float32) for v in shared_t]
    state = dict(trainable=trainable, non_trainable=[v.numpy() + 0.1 for v in shared_n])
    evaluator = evaluation.Evaluator(config, state)
    key = tfkl.generate_key(config.key_dim, seed=3)
    client_lock = private.draw_lock_weights(evaluator.model, seed=[5])
    evaluator.set_secret(key, client_lock)
    thief, fresh_lock = evaluation.full_lock_thief(evaluator, config)
    assert [v.shape for v in fresh_lock] == [v.shape for v in thief.lock_vars] and len(fresh_lock) == 4
    (lock,) = private.lock_layers(evaluator.model)
    thief.set_secret(key, [k.numpy() for k in lock.materialized_kernels()])
    x = np.random.default_rng(0).uniform(size=(4, *config.input_shape)).astype(np.float32)
    assert _max_difference(thief.model(x, training=False), evaluator.model(x, training=False)) < TOLERANCE


def test_train_and_evaluate_a_compact_run_end_to_end(tmp_path):
    """`tff_programs.train --lock_kernel=compact` then `tff_programs.evaluate`: the key table's entries (a)-(e),
    entry (e) by a thief that fits a full lock."""
    from tests.helpers import finish, start_binary

    root = str(tmp_path / "run")
    train = ["--dataset=digits", "--num_clients=2", "--model=lenet", "--rounds=1", "--key_dim=16"]
    commands = [
        ["tff_programs.train", f"--root_dir={root}", "--lock_kernel=compact", "--lock_affine=spatial", *train],
        ["tff_programs.evaluate", f"--root_dir={root}", "--public_sizes=20", "--recovery_steps=2"],
    ]
    for index, command in enumerate(commands):
        log = tmp_path / f"log{index}"
        assert finish(start_binary(*command, log=str(log)), 600) == 0, log.read_text()[-2000:]
    output = (tmp_path / "log1").read_text()
    assert "a_own_key_and_lock" in output and "d_global_zero_lock" in output
    assert "e_lock_recovery_20" in output and "e_from_scratch_20" in output
