"""FedKL/FedAvg in TFF: nothing private leaves a client (types and values), faults, resume."""

import collections
import dataclasses
import glob
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from attacks import cases, targets
from attacks import model as attack_model
from tff_programs import contexts
import tfkl
from tfkl import capture as capture_lib
from tfkl import data, models, optimizers, private, training
from tfkl.federated import algorithms, client_data, program, run_dir, simulation
from tfkl.federated.client_store import ClientStateError, ClientStore
from tfkl.federated.config import Config, ProgramError, build_process

SHAPE = (16, 16, 1)
KEY_DIM = 16  # a key length no shared variable has, so private shapes are recognisable


@pytest.fixture(scope="module", autouse=True)
def context():
    contexts.install_context()
    yield
    contexts.shutdown()


def digits_subset(train_size, test_size, seed):
    """A small random subset of the digits data set (train and test)."""
    full = data.load("digits")
    rng = np.random.default_rng(seed)
    train, test = rng.permutation(len(full.y_train))[:train_size], rng.permutation(len(full.y_test))[:test_size]
    return data.Dataset("digits", full.x_train[train], full.y_train[train], full.x_test[test], full.y_test[test], 10)


@pytest.fixture(scope="module")
def digits():
    return digits_subset(120, 60, seed=0)


def make_config(**overrides):
    options = dict(
        input_shape=SHAPE,
        num_clients=3,
        clients_per_round=3,
        batch_size=16,
        learning_rate=0.05,
        key_dim=KEY_DIM,
        seeded_keys=True,
        seed=1,
    )
    options.update(overrides)
    return Config(**options)


def aggregated_types(computation):
    """The types of every CLIENTS-placed value an intrinsic turns into a SERVER-placed one."""
    found = []

    def clients_members(type_spec):
        if isinstance(type_spec, tff.FederatedType):
            return [type_spec.member] if type_spec.placement is tff.CLIENTS else []
        if isinstance(type_spec, tff.StructType):
            return [m for _, t in tff.structure.iter_elements(type_spec) for m in clients_members(t)]
        return []

    def visit(block):
        if isinstance(block, tff.framework.Intrinsic):
            signature = block.type_signature
            result = signature.result
            if isinstance(result, tff.FederatedType) and result.placement is tff.SERVER and signature.parameter:
                found.extend((block.uri, m) for m in clients_members(signature.parameter))
        for child in block.children():
            visit(child)

    visit(computation.to_building_block())
    return found


def tensor_shapes(type_spec):
    if isinstance(type_spec, tff.TensorType):
        return [tuple(type_spec.shape)]
    if isinstance(type_spec, tff.FederatedType):
        return tensor_shapes(type_spec.member)
    return [s for _, t in tff.structure.iter_elements(type_spec) for s in tensor_shapes(t)]


def test_type_signature_only_shared_update_reaches_server():
    config = make_config()
    process = build_process(config, return_client_updates=True)
    model = config.model_fn()()
    private_shapes = [tuple(v.shape) for v in tfkl.private_variables(model)]
    shared_shapes = [tuple(v.shape) for v in tfkl.shared_variables(model)]
    assert (KEY_DIM,) in private_shapes and (KEY_DIM, 12) in private_shapes

    crossing = aggregated_types(process.next)
    assert crossing and {uri for uri, _ in crossing} == {"federated_sum"}
    crossing_shapes = [s for _, member in crossing for s in tensor_shapes(member)]
    # Exactly the shared variables (update) plus scalars (weight, metrics): the lock's biases,
    # shaped like the conv biases, are not among them either.
    assert sorted(s for s in crossing_shapes if s) == sorted(shared_shapes)
    server_state, _, metrics, _ = process.next.type_signature.result
    assert metrics.placement is tff.SERVER and not [s for s in tensor_shapes(metrics) if s]
    for state in (server_state, process.initialize.type_signature.result):
        assert state.placement is tff.SERVER
        assert sorted(s for s in tensor_shapes(state) if s) == sorted(shared_shapes)


def test_the_round_is_composed_of_parts_whose_types_fit():
    model_fn = make_config().model_fn()
    types = algorithms.round_types(model_fn(), keep_statistics=False, persist_optimizer_state=True)
    aggregator = tff.aggregators.MeanFactory().create(types.update, tff.TensorType(np.float32))
    initialize, with_aggregator = algorithms.build_initializer(
        model_fn, tff.learning.optimizers.build_sgdm(1.0), aggregator
    )
    state = initialize.type_signature.result
    distributor = algorithms.build_distributor(state.member)
    assert distributor.type_signature.result == tff.FederatedType(types.shared, tff.CLIENTS, all_equal=True)
    client_update = algorithms.build_client_work(
        model_fn, optimizers.TorchSGD(0.1), types, return_client_updates=False, weight_by_examples=True
    )
    assert client_update.type_signature.parameter[0] == types.shared
    assert client_update.type_signature.result.client_state == types.client_state
    finalizer = algorithms.build_finalizer(
        tff.learning.optimizers.build_sgdm(1.0), state.member, types.update, with_aggregator
    )
    assert finalizer.type_signature.result == state
    next_fn = algorithms.compose_round(distributor, client_update, aggregator, finalizer)
    assert next_fn.type_signature.parameter.server_state == state
    assert next_fn.type_signature.result[0] == state


def _contains(secret, arrays):
    secret = np.asarray(secret).ravel()
    return any(np.isin(secret, np.asarray(a).ravel()).any() for a in arrays)


def test_values_server_state_aggregate_and_captures_hold_no_secret(digits, tmp_path):
    config = make_config(local_epochs=2, batch_size=12)
    metrics = program.train(
        str(tmp_path), config, program.RunOptions(rounds=2, capture_rounds=("all",), progress=False), dataset=digits
    )
    assert metrics["clients_accepted"] == 3
    process = build_process(config)
    server_state, client_states, round_num = run_dir.restore(str(tmp_path), config, process)
    assert round_num == 2
    secrets = [a for s in client_states.values() for a in s["key"] + s["lock"]]
    assert len(secrets) == 3 * 5
    server_arrays = [np.asarray(a) for a in tf.nest.flatten(server_state)]
    captures = [capture_lib.load_capture(p) for p in sorted(glob.glob(str(tmp_path / "captures" / "*.npz")))]
    assert len(captures) == 6
    captured = [a for c in captures for a in c.global_weights + c.update]
    # The aggregate the server applied in round 2: the new global weights minus the ones it sent.
    layout = capture_lib.SharedLayout(config.model_fn()(), process.parts)
    new_global = layout.flatten(server_state["trainable"], server_state["non_trainable"])
    aggregate = [n - g for n, g in zip(new_global, captures[-1].global_weights)]
    assert any(np.abs(a).sum() > 0 for a in aggregate)
    for secret in secrets:
        assert not _contains(secret, server_arrays)
        assert not _contains(secret, captured)
        assert not _contains(secret, aggregate)
    for path in glob.glob(str(tmp_path / "server" / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                blob = f.read()
            for state in client_states.values():
                assert state["key"][0].astype("<f4").tobytes()[:32] not in blob
    meta = captures[0].meta
    assert meta["lock"] is True and meta["ground_truth"]["client_index"] == int(meta["client_id"])
    assert meta["num_steps"] == meta["local_epochs"] * int(np.ceil(meta["num_examples"] / config.batch_size))
    # The scorer's view: the very batches the client trained on, rebuilt from the meta alone.
    batches = cases.capture_user_data(meta, digits).batches
    assert len(batches) == meta["num_steps"] and sum(len(y) for _, y in batches) == meta["examples_processed"]
    client = client_data.client_partition(config, digits)[int(meta["client_id"])]
    assert sorted(np.concatenate([y for _, y in batches[: len(batches) // 2]])) == sorted(digits.y_train[client])


@pytest.mark.parametrize("algorithm", ["fedavg", "fedkl"])
@pytest.mark.parametrize(
    "client",
    [
        dict(batch_size=12),  # 40 examples: 4 steps of 12, 12, 12, 4
        dict(batch_size=2, num_clients=15, learning_rate=0.01),  # the U regime's kind: 8 examples, 4 steps of 2
    ],
)
def test_attacker_replay_reproduces_a_tff_captured_update(algorithm, client, digits, tmp_path):
    """What the attacks invert is what TFF's clients upload: replaying the captured client's local
    steps on its true batches (with its secret, for FedKL) gives the captured update."""
    config = make_config(algorithm=algorithm, local_epochs=1, **client)
    program.train(
        str(tmp_path), config, program.RunOptions(rounds=1, capture_rounds=(1,), progress=False), dataset=digits
    )
    capture = capture_lib.load_capture(sorted(glob.glob(str(tmp_path / "captures" / "*.npz")))[0])
    batches = cases.capture_user_data(capture.meta, digits).batches
    images = tf.constant(np.concatenate([x for x, _ in batches]))
    labels = tf.constant(np.concatenate([y for _, y in batches]))
    secret = None
    if algorithm == "fedkl":
        _, client_states, _ = run_dir.restore(str(tmp_path), config, build_process(config))
        (lock,) = private.lock_layers(config.model_fn()())  # round 1 starts from model_fn's lock weights
        secret = {
            lock.name: (client_states[capture.meta["client_id"]]["key"][0],)
            + tuple(v.numpy() for v in lock.private_weights[1:])
        }
    view = attack_model.ServerView.from_capture(capture)
    attacker = attack_model.AttackerModel(view, "oracle" if secret else "none", secret=secret)
    target = targets.from_capture(capture)
    replayed = targets.simulate(attacker, target, images, labels, tf.zeros([0]))
    assert target.num_steps == len(batches) == 4 and max(np.abs(v).max() for v in target.values) > 1e-3
    for predicted, captured in zip(replayed, target.values):
        np.testing.assert_allclose(predicted.numpy(), captured, atol=1e-5)


def test_private_lock_init_gives_each_client_a_lock_the_server_never_sees(digits, tmp_path):
    config = make_config(lock_init="private")
    program.train(
        str(tmp_path), config, program.RunOptions(rounds=1, capture_rounds=(1,), progress=False), dataset=digits
    )
    initial = ClientStore(str(tmp_path / "clients")).load(0, KEY_DIM)
    model_fns_lock = build_process(config).parts.split(config.model_fn()())[3]
    client_lock = config.client_lock_fn()
    for cid, state in initial.items():
        for drawn, expected, model_fns in zip(state["lock"], client_lock(cid), model_fns_lock):
            np.testing.assert_array_equal(drawn, expected)  # seeded_keys: reproducible per client
            assert drawn.shape == tuple(model_fns.shape) and not np.array_equal(drawn, model_fns.numpy())
    assert not np.array_equal(initial["0"]["lock"][0], initial["1"]["lock"][0])
    with pytest.raises(ValueError, match="lock_init"):
        make_config(lock_init="secret").client_lock_fn()
    captures = [capture_lib.load_capture(p) for p in glob.glob(str(tmp_path / "captures" / "*.npz"))]
    captured = [a for c in captures for a in c.global_weights + c.update]
    assert captures and captures[0].meta["lock_init"] == "private"
    locks = [w for state in initial.values() for w in state["lock"]]
    assert not any(a.shape == w.shape and np.allclose(a, w) for a in captured for w in locks)
    # Values on a 2^24 grid: a few coincide with shared weights by chance, no more.
    pool = np.concatenate([np.ravel(a) for a in captured])
    assert np.isin(np.concatenate([np.ravel(w) for w in locks]), pool).mean() < 0.05


def test_one_client_round_equals_central_training(digits):
    """The TFF round's client work is the central Trainer's epoch (same key, data order, optimizer)."""
    model_fn = lambda: models.build("lenet", SHAPE, 10, lock=True, seed=3, key_dim=KEY_DIM)  # noqa: E731
    optimizer = optimizers.TorchSGD(0.05)
    process = algorithms.build_fedkl_process(model_fn, optimizer)
    key = tfkl.generate_key(KEY_DIM, seed=5)
    dataset = data.make_dataset(digits.x_train[:50], digits.y_train[:50], SHAPE, 16)
    server_state = process.initialize()
    server_state, states, metrics, _ = process.next(
        server_state, np.float32(0.05), [dataset], [process.initial_client_state(key)]
    )
    model = model_fn()
    tfkl.set_key(model, key)
    trainer = training.Trainer(model, optimizer)
    trainer.fit_epoch(dataset)
    shared_t, shared_n, _, lock = process.parts.split(model)
    for got, want in zip(
        list(server_state["trainable"]) + list(server_state["non_trainable"]) + states[0]["lock"],
        shared_t + shared_n + lock,
    ):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-6)
    for got, want in zip(states[0]["optimizer"], trainer.buffers):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-6)
    assert metrics["num_examples"] == 50


def test_fedavg_baseline_has_no_private_state_but_momentum(digits, tmp_path):
    config = make_config(algorithm="fedavg")
    metrics = program.train(str(tmp_path), config, program.RunOptions(rounds=1, progress=False), dataset=digits)
    assert metrics["clients_accepted"] == 3 and np.isfinite(metrics["loss"])
    _, client_states, _ = run_dir.restore(str(tmp_path), config, build_process(config))
    state = client_states["0"]
    assert not state["key"] and not state["lock"] and len(state["optimizer"]) == 8
    assert any(np.abs(b).sum() > 0 for b in state["optimizer"])


def test_fedavg_control_has_a_learned_affine_and_no_key_or_lock(digits, tmp_path):
    config = make_config(algorithm="fedavg-norm")
    model = config.model_fn()()
    assert not tfkl.private_variables(model) and not tfkl.lock_layers(model)
    norms = [layer for layer in model.layers if isinstance(layer, tfkl.AffineNorm)]
    assert [layer.name for layer in norms] == ["conv1_norm"]
    # The same backbone as FedKL's: the locked model's shared weights plus the control's gamma and beta.
    locked = make_config().model_fn()()
    assert sorted(v.name.replace("_keylock", "_norm") for v in tfkl.shared_variables(locked)) == sorted(
        v.name for v in model.variables if "gamma" not in v.name and "beta" not in v.name
    )
    metrics = program.train(str(tmp_path), config, program.RunOptions(rounds=1, progress=False), dataset=digits)
    assert metrics["clients_accepted"] == 3 and np.isfinite(metrics["loss"])
    process = build_process(config)
    server_state, client_states, _ = run_dir.restore(str(tmp_path), config, process)
    assert not client_states["0"]["key"] and not client_states["0"]["lock"]
    gamma = server_state["trainable"][[v.name for v in model.trainable_variables].index("conv1_norm/gamma:0")]
    assert not np.allclose(gamma, 1.0)  # trained and averaged like every shared weight
    with pytest.raises(ValueError, match="random_key_penalty needs algorithm=fedkl"):
        make_config(algorithm="fedavg-norm", random_key_penalty=1.0)


def test_key_distribution_and_penalty_are_part_of_the_run(digits, tmp_path):
    config = make_config(key_distribution="rademacher", random_key_penalty=0.5)
    metrics = program.train(str(tmp_path), config, program.RunOptions(rounds=1, progress=False), dataset=digits)
    assert metrics["clients_accepted"] == 3 and np.isfinite(metrics["loss"])
    _, client_states, _ = run_dir.restore(str(tmp_path), config, build_process(config))
    for state in client_states.values():
        assert set(np.unique(state["key"][0])) == {-1.0, 1.0}
    for changed in (dict(key_distribution="uniform"), dict(random_key_penalty=0.0)):
        with pytest.raises(ProgramError, match="another run"):
            program.train(
                str(tmp_path),
                dataclasses.replace(config, **changed),
                program.RunOptions(rounds=2, progress=False),
                dataset=digits,
            )
    assert (
        config.random_key(seed=[0, 1]).tolist()
        == tfkl.generate_key(KEY_DIM, seed=[0, 1], distribution="rademacher").tolist()
    )


def test_sampling_and_private_state_with_many_clients(digits, tmp_path):
    config = make_config(num_clients=20, clients_per_round=4, split="dirichlet")
    program.train(str(tmp_path), config, program.RunOptions(rounds=2, progress=False), dataset=digits)
    initial = ClientStore(str(tmp_path / "clients")).load(0, KEY_DIM)
    final = ClientStore(str(tmp_path / "clients")).load(2, KEY_DIM)
    sampled = {c for r in (1, 2) for c in simulation.sample_clients(20, 4, config.seed, r)}
    # A client exists from its first sampling on: manifest 0 lists every client's initial state.
    assert set(initial) == set(final) == sampled and 4 < len(sampled) <= 8
    changed = {c for c in final if any(not np.array_equal(a, b) for a, b in zip(final[c]["lock"], initial[c]["lock"]))}
    assert changed == sampled
    last = ClientStore(str(tmp_path / "clients")).last_update_rounds(2)
    assert {c for c, r in last.items() if r == 2} == set(simulation.sample_clients(20, 4, config.seed, 2))
    assert {c for c, r in last.items() if r > 0} == sampled
    assert len({final[c]["key"][0].tobytes() for c in final}) == len(sampled)
    assert {p.name for p in (tmp_path / "clients").iterdir() if p.is_dir()} == sampled  # none for the others
    for cid in final:
        assert os.stat(tmp_path / "clients" / cid / "key").st_mode & 0o777 == 0o600
        assert os.stat(tmp_path / "clients" / cid).st_mode & 0o777 == 0o700
        for state_file in (tmp_path / "clients" / cid).glob("state_*.npz"):
            assert state_file.stat().st_mode & 0o777 == 0o600


def _count_state_reads(monkeypatch):
    """The client ids whose state files ClientStore reads, in order."""
    reads = []
    read_state = ClientStore._load_state

    def counting(self, cid, entry, key_dim):
        reads.append(cid)
        return read_state(self, cid, entry, key_dim)

    monkeypatch.setattr(ClientStore, "_load_state", counting)
    return reads


def test_the_driver_reads_only_the_sampled_clients_states(digits, tmp_path, monkeypatch):
    config = make_config(num_clients=12, clients_per_round=3)
    reads = _count_state_reads(monkeypatch)
    program.train(str(tmp_path), config, program.RunOptions(rounds=3, keep_rounds=1, progress=False), dataset=digits)
    sampled = [simulation.sample_clients(12, 3, config.seed, r) for r in (1, 2, 3)]
    # Each round reads the states of its sampled clients that exist (a new one is created, not read), no other.
    expected = [c for r, ids in enumerate(sampled) for c in ids if any(c in earlier for earlier in sampled[:r])]
    assert expected and reads == expected
    reads.clear()
    program.train(str(tmp_path), config, program.RunOptions(rounds=4, keep_rounds=1, progress=False), dataset=digits)
    round_4 = simulation.sample_clients(12, 3, config.seed, 4)
    existed = {c for ids in sampled for c in ids}
    # Resuming reads the next round's existing clients (checked before anything is written), then the round does.
    assert reads == 2 * [c for c in round_4 if c in existed] and set(round_4) - existed
    existing = existed | set(round_4)
    store = ClientStore(str(tmp_path / "clients"))
    assert set(store.client_ids(4)) == existing
    # Pruned to rounds 0 and 4: exactly the state files those manifests list remain, each readable.
    assert store.rounds() == [0, 4]
    listed = store.files(0) | store.files(4)
    on_disk = {f"{p.parent.name}/{p.name}" for p in (tmp_path / "clients").glob("*/state_*")}
    assert on_disk == listed
    assert set(store.load(4, KEY_DIM)) == existing


def test_evaluation_reads_only_the_evaluated_clients_states(digits, tmp_path, monkeypatch):
    from tfkl.federated import evaluation

    config = make_config(num_clients=40, clients_per_round=3)
    program.train(str(tmp_path), config, program.RunOptions(rounds=2, progress=False), dataset=digits)
    reads = _count_state_reads(monkeypatch)
    result = evaluation.evaluate(str(tmp_path), public_sizes=(20,), max_clients=2, recovery_steps=1, dataset=digits)
    round_2 = simulation.sample_clients(40, 3, config.seed, 2)
    assert result["evaluated_clients"] == round_2[:2] and reads == round_2[:2]  # the 2 most recent, no other


def test_a_client_created_on_its_first_sampling_keeps_its_state(digits, tmp_path):
    """A new client's key and initial state are on disk before its first round: a round interrupted and
    run again, or a resumed run, uses them (CSPRNG keys, private locks); run to the end, the result is
    an uninterrupted run's."""
    config = make_config(num_clients=12, clients_per_round=3, seeded_keys=False, lock_init="private")
    root = str(tmp_path / "run")
    program.train(root, config, program.RunOptions(rounds=1, progress=False), dataset=digits)
    process = build_process(config)
    manager = run_dir.RunStateManager(root)
    round_2 = simulation.sample_clients(12, 3, config.seed, 2)
    new = [c for c in round_2 if c not in simulation.sample_clients(12, 3, config.seed, 1)]
    assert new
    # Round 2 starts (its new clients are created), and the run is killed before round 2 is saved.
    before, created = manager.client_states(config, process, 1, round_2)
    assert created == new and set(before) == set(round_2)
    again, created = run_dir.RunStateManager(root).client_states(config, process, 1, round_2)
    assert created == []
    for cid in round_2:
        for a, b in zip(tf.nest.flatten(before[cid]), tf.nest.flatten(again[cid])):
            np.testing.assert_array_equal(a, b)
    # An addition interrupted after manifest 0 but before manifest 1 listed the client keeps manifest 0's state.
    manifest_1 = manager.clients._read_manifest(1)
    del manifest_1[new[0]]
    manager.clients._write_manifest(1, manifest_1)
    third, created = run_dir.RunStateManager(root).client_states(config, process, 1, [new[0]])
    assert created == []
    for a, b in zip(tf.nest.flatten(before[new[0]]), tf.nest.flatten(third[new[0]])):
        np.testing.assert_array_equal(a, b)
    program.train(root, config, program.RunOptions(rounds=2, progress=False), dataset=digits)
    store = ClientStore(str(tmp_path / "run" / "clients"))
    initial, after = store.load(0, KEY_DIM), store.load(2, KEY_DIM)
    for cid in new:
        np.testing.assert_array_equal(after[cid]["key"][0], before[cid]["key"][0])
        for a, b in zip(initial[cid]["lock"], before[cid]["lock"]):
            np.testing.assert_array_equal(a, b)
    assert store.last_update_rounds(1)[new[0]] == 0 and store.last_update_rounds(2)[new[0]] == 2

    # Seeded keys: an interrupted and resumed run equals an uninterrupted one, state for state.
    config = make_config(num_clients=12, clients_per_round=3)
    program.train(str(tmp_path / "full"), config, program.RunOptions(rounds=3, progress=False), dataset=digits)
    resumed = str(tmp_path / "resumed")
    program.train(resumed, config, program.RunOptions(rounds=1, progress=False), dataset=digits)
    run_dir.RunStateManager(resumed).client_states(
        config, build_process(config), 1, simulation.sample_clients(12, 3, config.seed, 2)
    )
    program.train(resumed, config, program.RunOptions(rounds=3, progress=False), dataset=digits)
    process = build_process(config)
    full, back = run_dir.restore(str(tmp_path / "full"), config, process), run_dir.restore(resumed, config, process)
    assert full[2] == back[2] == 3 and set(full[1]) == set(back[1])
    for a, b in zip(tf.nest.flatten(full[:2]), tf.nest.flatten(back[:2])):
        np.testing.assert_array_equal(a, b)


def test_nan_update_rejected_and_dropout_tolerated(digits, tmp_path):
    config = make_config()
    options = program.RunOptions(rounds=2, inject_nan=((1, "1"),), inject_failure=((2, "2"),), progress=False)
    program.train(str(tmp_path), config, options, dataset=digits)
    rows = list(np.genfromtxt(tmp_path / "metrics.csv", delimiter=",", names=True))
    assert (rows[0]["clients_rejected"], rows[0]["clients_accepted"]) == (1, 2)
    assert (rows[1]["clients_dropped"], rows[1]["clients_accepted"]) == (1, 2)
    process = build_process(config)
    server_state, states, _ = run_dir.restore(str(tmp_path), config, process)
    assert all(np.isfinite(a).all() for a in tf.nest.flatten(server_state))
    initial = ClientStore(str(tmp_path / "clients")).load(0, KEY_DIM)
    after_round_1 = ClientStore(str(tmp_path / "clients")).load(1, KEY_DIM)
    # The rejected client keeps its previous state; the others moved on.
    assert all(np.array_equal(a, b) for a, b in zip(after_round_1["1"]["lock"], initial["1"]["lock"]))
    assert not all(np.array_equal(a, b) for a, b in zip(after_round_1["0"]["lock"], initial["0"]["lock"]))
    # The client that failed mid-round keeps its round-1 state; the round went on without it.
    assert ClientStore(str(tmp_path / "clients")).last_update_rounds(2) == {"0": 2, "1": 2, "2": 1}


def test_resume_equals_uninterrupted_run(digits, tmp_path):
    config = make_config()
    program.train(str(tmp_path / "full"), config, program.RunOptions(rounds=3, progress=False), dataset=digits)
    program.train(str(tmp_path / "resumed"), config, program.RunOptions(rounds=1, progress=False), dataset=digits)
    program.train(str(tmp_path / "resumed"), config, program.RunOptions(rounds=3, progress=False), dataset=digits)
    process = build_process(config)
    full = run_dir.restore(str(tmp_path / "full"), config, process)
    resumed = run_dir.restore(str(tmp_path / "resumed"), config, process)
    assert full[2] == resumed[2] == 3
    for a, b in zip(tf.nest.flatten(full[0]), tf.nest.flatten(resumed[0])):
        np.testing.assert_array_equal(a, b)
    for cid in full[1]:
        for a, b in zip(tf.nest.flatten(full[1][cid]), tf.nest.flatten(resumed[1][cid])):
            np.testing.assert_array_equal(a, b)


def test_other_runs_root_dir_and_corrupt_state_refused(digits, tmp_path):
    config = make_config()
    program.train(str(tmp_path), config, program.RunOptions(rounds=1, progress=False), dataset=digits)
    snapshot = {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "**"), recursive=True) if os.path.isfile(p)}
    with pytest.raises(ProgramError, match="another run"):
        program.train(
            str(tmp_path), make_config(batch_size=8), program.RunOptions(rounds=2, progress=False), dataset=digits
        )
    state_file = tmp_path / "clients" / "1" / "state_00001.npz"
    state_file.write_bytes(state_file.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ProgramError, match="state_00001.npz does not match the manifest of round 1"):
        program.train(str(tmp_path), config, program.RunOptions(rounds=2, progress=False), dataset=digits)
    (tmp_path / "clients" / "1" / "key").write_bytes(b"garbage")
    state_file.write_bytes(snapshot[str(state_file)])
    with pytest.raises(ProgramError, match="1/key does not match the manifest of round 1"):
        program.train(str(tmp_path), config, program.RunOptions(rounds=2, progress=False), dataset=digits)
    (tmp_path / "clients" / "1" / "key").write_bytes(snapshot[str(tmp_path / "clients" / "1" / "key")])
    os.remove(state_file)
    with pytest.raises(ProgramError, match="state_00001.npz does not match .*: missing; restore it"):
        program.train(str(tmp_path), config, program.RunOptions(rounds=2, progress=False), dataset=digits)
    state_file.write_bytes(snapshot[str(state_file)])
    server_data = glob.glob(str(tmp_path / "server" / "program_state_1" / "variables" / "variables.data-*"))[0]
    blob = bytearray(snapshot[server_data])
    blob[len(blob) // 2] ^= 0xFF
    with open(server_data, "wb") as f:
        f.write(blob)
    with pytest.raises(ProgramError, match="variables.data-.* does not match .*: changed"):
        program.train(str(tmp_path), config, program.RunOptions(rounds=2, progress=False), dataset=digits)
    with open(server_data, "wb") as f:
        f.write(snapshot[server_data])
    after = {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "**"), recursive=True) if os.path.isfile(p)}
    assert after == snapshot  # nothing was overwritten by the refused runs


def test_client_state_round_trip_keeps_structure(tmp_path):
    store = ClientStore(str(tmp_path))
    state = collections.OrderedDict(
        key=[tfkl.generate_key(4, seed=0)],
        lock=[np.ones((4, 2), np.float32)],
        optimizer=[],
        statistics=[np.zeros(2, np.float32)],
    )
    store.save(3, {"0": state}, changed={"0"})
    loaded = store.load(3, 4)["0"]
    assert list(loaded) == ["key", "lock", "optimizer", "statistics"]
    for a, b in zip(tf.nest.flatten(loaded), tf.nest.flatten(state)):
        np.testing.assert_array_equal(a, b)
    assert store.rounds() == [3]
    # A manifest in format 1 (an object per client: tfkl 0.2.0 and earlier) reads the same.
    with open(store.manifest_path(3)) as f:
        entry = json.load(f)["clients"]["0"].split(" ")
    counts = dict(zip(("lock", "optimizer", "statistics"), map(int, entry[2:5])))
    old = {"file": "0/state_00003.npz", "sha256": entry[1], "counts": counts, "has_key": True}
    with open(store.manifest_path(3), "w") as f:
        json.dump({"round": 3, "clients": {"0": old}}, f, indent=1)
    for a, b in zip(tf.nest.flatten(store.load(3, 4)["0"]), tf.nest.flatten(state)):
        np.testing.assert_array_equal(a, b)
    assert store.last_update_rounds(3) == {"0": 3} and store.files(3) == {"0/state_00003.npz"}
    with open(store.manifest_path(3), "w") as f:
        json.dump({"format": 3, "round": 3, "clients": {}}, f)
    with pytest.raises(ClientStateError, match="format 3 is newer"):
        store.load(3, 4)


def test_evaluation_matrix(digits, tmp_path):
    from attacks import lock_recovery
    from tfkl.federated import evaluation

    config = make_config()
    program.train(str(tmp_path), config, program.RunOptions(rounds=1, progress=False), dataset=digits)
    result = evaluation.evaluate(
        str(tmp_path), public_sizes=(10, 20), recovery_steps=3, dataset=digits, lock_recovery=lock_recovery.recover
    )
    assert result["round"] == 1 and result["public_examples"] == 20 and result["evaluation_examples"] == 40
    for name in (
        "a_own_key_and_lock",
        "b_own_lock_random_key",
        "c_own_lock_other_key",
        "c_other_key_and_lock",
        "f_own_secret_own_statistics",
    ):
        assert set(result[name]["per_client"]) == {"0", "1", "2"}
        assert 0 <= result[name]["mean"] <= 1
    # Zero lock weights make gamma = beta = 0: a constant prediction, at most the top class's share.
    _, held_out = data.split_test(digits, 20, 0)
    top_share = np.bincount(digits.y_test[held_out]).max() / len(held_out)
    assert result["d_global_zero_lock"] <= top_share + 1e-9
    assert set(result["e_lock_recovery"]) == {"10", "20"}
    recovery = result["e_lock_recovery"]["20"]
    assert recovery["examples"] == 20 and set(recovery["by_statistics"]) == set(lock_recovery.RECOVERY_STATISTICS)
    assert set(recovery["affine_by_statistics"]) == set(lock_recovery.RECOVERY_STATISTICS)
    assert recovery["accuracy"] == max(
        list(recovery["by_statistics"].values()) + list(recovery["affine_by_statistics"].values())
    )
    assert "a_own_key_and_lock" in evaluation.format_matrix(result)
    assert "e_from_scratch_20" in evaluation.format_matrix(result)
    scratch = result["e_from_scratch"]["20"]
    assert set(result["e_from_scratch"]) == {"10", "20"} and scratch["steps"] == evaluation.scratch_steps(20) == 300
    assert 0 <= scratch["accuracy"] <= 1
    assert scratch["recovery_minus_scratch"] == pytest.approx(recovery["accuracy"] - scratch["accuracy"])
    # The yardstick trains every weight of model_fn's model on the public examples alone: it learns them.
    eval_ds = data.make_dataset(digits.x_test[:20], digits.y_test[:20], SHAPE, 20)
    fitted = evaluation.train_from_scratch(config, digits.x_test[:20], digits.y_test[:20], eval_ds, seed=0)
    assert fitted >= 0.9
    # Only the 'public' recovery re-estimates the moving statistics (on the public examples).
    process = build_process(config)
    server_state, _, _ = run_dir.restore(str(tmp_path), config, process)
    evaluator = evaluation.Evaluator(config, server_state)
    for statistics, moves in (("server", False), ("public", True)):
        evaluator.set_statistics(evaluator.global_statistics)
        lock_recovery.recover_lock(evaluator, digits.x_test[:20], digits.y_test[:20], SHAPE, 3, 0, statistics)
        after = [v.numpy() for v in evaluator.statistics_vars]
        changed = any(not np.array_equal(a, b) for a, b in zip(after, evaluator.global_statistics))
        assert changed == moves, statistics
    # From the affine start only the biases move: gamma = relu(scale bias), beta = relu(shift bias), any key.
    evaluator.set_secret(tfkl.generate_key(KEY_DIM), lock_recovery.affine_start(evaluator.lock_vars))
    biases = evaluator.lock_vars[1::2]
    lock_recovery.recover_lock(
        evaluator, digits.x_test[:20], digits.y_test[:20], SHAPE, 3, 0, "server", variables=biases
    )
    scale_kernel, scale_bias, shift_kernel, shift_bias = [v.numpy() for v in evaluator.lock_vars]
    assert not scale_kernel.any() and not shift_kernel.any() and not np.allclose(scale_bias, 1.0)
    gamma, beta = evaluator.model.get_layer("conv1_keylock").lock_parameters()
    np.testing.assert_allclose(gamma, np.maximum(scale_bias, 0))
    np.testing.assert_allclose(beta, np.maximum(shift_bias, 0))


def test_accuracy_by_round_covers_every_kept_round(digits, tmp_path):
    from tfkl.federated import evaluation

    config = make_config()
    program.train(str(tmp_path), config, program.RunOptions(rounds=2, keep_rounds=5, progress=False), dataset=digits)
    curve = evaluation.accuracy_by_round(str(tmp_path), public_size=20, dataset=digits)
    assert sorted(curve) == [0, 1, 2] == run_dir.complete_rounds(str(tmp_path))
    last = evaluation.evaluate(str(tmp_path), public_sizes=(20,), recovery_steps=1, dataset=digits)
    assert curve[2] == last["a_own_key_and_lock"]["mean"]


def test_local_statistics_and_fresh_optimizer_options(digits, tmp_path):
    config = make_config(statistics="local", persist_optimizer_state=False, client_weighting="uniform")
    program.train(
        str(tmp_path), config, program.RunOptions(rounds=1, capture_rounds=(1,), progress=False), dataset=digits
    )
    process = build_process(config)
    server_state, states, _ = run_dir.restore(str(tmp_path), config, process)
    initial_server = process.initialize()
    # Kept-local statistics never reach the server: its copy stays at the initial values.
    for now, before in zip(server_state["non_trainable"], initial_server["non_trainable"]):
        np.testing.assert_array_equal(now, before)
    assert not states["0"]["optimizer"] and len(states["0"]["statistics"]) == 2
    assert not np.array_equal(states["0"]["statistics"][0], states["1"]["statistics"][0])
    capture = capture_lib.load_capture(glob.glob(str(tmp_path / "captures" / "*.npz"))[0])
    assert capture.meta["optimizer_state"] == "fresh" and capture.meta["statistics"] == "local"
    assert all(not np.any(u) for u, t in zip(capture.update, capture.meta["trainable"]) if not t)


def test_learning_rate_schedule_reaches_the_clients(digits, tmp_path):
    config = make_config(lr_milestones=(1,), lr_gamma=0.2)
    assert [config.round_learning_rate(r) for r in (1, 2, 3)] == pytest.approx([0.05, 0.01, 0.01])
    program.train(
        str(tmp_path), config, program.RunOptions(rounds=2, capture_rounds=("all",), progress=False), dataset=digits
    )
    rates = {
        capture_lib.load_capture(p).meta["round"]: capture_lib.load_capture(p).meta["learning_rate"]
        for p in glob.glob(str(tmp_path / "captures" / "*.npz"))
    }
    assert rates == pytest.approx({1: 0.05, 2: 0.01})
    rows = np.genfromtxt(tmp_path / "metrics.csv", delimiter=",", names=True)
    assert list(rows["learning_rate"]) == pytest.approx([0.05, 0.01])


def test_bad_split_and_foreign_directory_refused(digits, tmp_path):
    with pytest.raises(ProgramError, match="cannot split"):
        program.train(
            str(tmp_path / "a"),
            make_config(num_clients=100, split="shards"),
            program.RunOptions(rounds=1, progress=False),
            dataset=digits,
        )
    assert not os.path.exists(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ProgramError, match="not empty"):
        program.train(str(tmp_path / "b"), make_config(), program.RunOptions(rounds=1, progress=False), dataset=digits)
    assert os.listdir(tmp_path / "b") == ["notes.txt"]


def test_cached_client_data_equals_in_memory(digits, tmp_path):
    config = make_config(local_epochs=2, batch_size=16)
    indices = np.arange(10, 50)
    cached = client_data.client_dataset(config, digits, indices, 7, str(tmp_path), "3")
    again = client_data.client_dataset(config, digits, indices, 7, str(tmp_path), "3")  # reads the snapshot
    inline = client_data.client_dataset(config, digits, indices, 7)
    batches = [list(d.as_numpy_iterator()) for d in (cached, again, inline)]
    assert len(batches[0]) == 2 * 3 and [len(b[1]) for b in batches[0]] == [16, 16, 8] * 2
    for other in batches[1:]:
        for (x, y), (x2, y2) in zip(batches[0], other):
            np.testing.assert_array_equal(x, x2)
            np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(batches[0][0][1], batches[0][3][1])  # reshuffled each epoch
    # A new client's file written and read adds no function to the process (tf.data's Dataset.save and
    # load added some per call, kept for good: the driver's memory grew with every client).
    from tensorflow.python.eager import context as eager_context

    functions = len(eager_context.context().list_function_names())
    for client in range(4, 8):
        client_data.client_dataset(config, digits, indices, client, str(tmp_path), str(client))
    assert len(eager_context.context().list_function_names()) == functions
    assert sorted(os.listdir(tmp_path)) == [f"client_{c}.tfrecord" for c in range(3, 8)]


def test_interrupted_initialisation_keeps_the_saved_keys(digits, tmp_path):
    config = make_config(seeded_keys=False)  # CSPRNG keys: a restart would draw new ones
    program.train(str(tmp_path), config, program.RunOptions(rounds=1, progress=False), dataset=digits)
    store = ClientStore(str(tmp_path / "clients"))
    keys_before = {c: store.saved_key(c, KEY_DIM) for c in "012"}
    shutil.rmtree(tmp_path / "server")  # as if killed before the first server state was written
    program.train(str(tmp_path), config, program.RunOptions(rounds=1, progress=False), dataset=digits)
    _, states, _ = run_dir.restore(str(tmp_path), config, build_process(config))
    for c in "012":
        np.testing.assert_array_equal(store.saved_key(c, KEY_DIM), keys_before[c])
        np.testing.assert_array_equal(states[c]["key"][0], keys_before[c])
    with pytest.raises(ClientStateError, match="differs from its key file"):
        store.save(2, {"0": dict(states["0"], key=[tfkl.generate_key(KEY_DIM)])}, changed={"0"})


def test_regimes_t_victim_is_the_runs_captured_client(digits, tmp_path):
    """experiments.studies.regimes' T victims: the global model a run sent in the captured round and, for FedKL, the
    captured client's key and lock from before it. Replaying that client's steps gives its captured update."""
    from experiments.studies.regimes import run as regimes_run

    # Fresh momentum each round, as the attacker's replay assumes (a client that keeps it is not replayable).
    config = make_config(algorithm="fedkl", local_epochs=1, batch_size=12, key_dim=1024, persist_optimizer_state=False)
    options = program.RunOptions(rounds=2, capture_rounds=(2,), progress=False)
    program.train(regimes_run.train_dir(str(tmp_path), "fedkl"), config, options, dataset=digits)
    victim = cases.build_victims("lenet", SHAPE, 10, "pytorch", seed=5, threats=("oracle",))["locked"]
    server_known = regimes_run.load_trained(victim, str(tmp_path), 2)
    (lock,) = private.lock_layers(victim)
    initial_lock = [v.numpy() for v in private.lock_layers(config.model_fn()())[0].private_weights[1:]]
    for known, initial, current in zip(server_known[lock.name], initial_lock, lock.private_weights[1:]):
        np.testing.assert_array_equal(known, initial)  # model_fn's: all a server knows
        assert not np.array_equal(current.numpy(), initial)  # the client trained its lock in round 1
    capture = capture_lib.load_capture(sorted(glob.glob(str(tmp_path / "train" / "fedkl" / "captures" / "*.npz")))[0])
    batches = cases.capture_user_data(capture.meta, digits).batches
    images = tf.constant(np.concatenate([x for x, _ in batches]))
    labels = tf.constant(np.concatenate([y for _, y in batches]))
    attacker = attack_model.AttackerModel(
        attack_model.ServerView.from_model(victim), "oracle", secret=attack_model.extract_secret(victim)
    )
    target = targets.from_capture(capture)
    replayed = targets.simulate(attacker, target, images, labels, tf.zeros([0]))
    for predicted, captured in zip(replayed, target.values):
        np.testing.assert_allclose(predicted.numpy(), captured, atol=1e-5)
