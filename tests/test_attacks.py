"""Attack module: attacker model fidelity, threat-model isolation, labels, metrics, real recovery."""

import time

import numpy as np
import pytest
import tensorflow as tf

import attacks
from attacks import base, cases, experiment, labels, metrics, targets
from attacks import model as model_lib
from tfkl import models, private

SHAPE = (8, 8, 1)


def _victim(lock, seed=3, normalization="batch", init="pytorch"):
    return models.build("lenet", SHAPE, 4, lock=lock, init=init, seed=seed, normalization=normalization)


def _images(count, seed=0):
    rng = np.random.default_rng(seed)
    smooth = rng.uniform(0, 1, (count, 4, 4, 1)).astype(np.float32)
    return tf.image.resize(smooth, SHAPE[:2]).numpy(), rng.integers(0, 4, count)


@pytest.mark.parametrize("lock,normalization", [(False, "batch"), (True, "batch"), (True, "group")])
def test_attacker_model_reproduces_the_client_gradient_without_touching_the_victim(lock, normalization):
    victim = _victim(lock, normalization=normalization)
    x, y = _images(2)
    before = [v.numpy() for v in victim.variables]
    target = cases.client_gradient(victim, x, y)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, victim.variables))
    threat = "oracle" if lock else "none"
    attacker = model_lib.AttackerModel(
        model_lib.ServerView.from_model(victim), threat, secret=model_lib.extract_secret(victim) if lock else None
    )
    predicted = targets.simulate(attacker, target, tf.constant(x), tf.constant(y), tf.zeros([0]))
    assert len(predicted) == len(target.values)
    for p, t in zip(predicted, target.values):
        np.testing.assert_allclose(p.numpy(), t, atol=1e-5)


def test_attacker_model_reproduces_an_inference_mode_gradient():
    victim = models.build("resnet20", SHAPE, 4, lock=False, init="pytorch", seed=3)
    rng = np.random.default_rng(1)
    for layer in victim.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.5, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2, layer.moving_variance.shape))
    x, y = _images(1)
    target = cases.client_gradient(victim, x, y, training=False)
    batch_statistics = cases.client_gradient(victim, x, y)
    assert (target.training, batch_statistics.training) == (False, True)
    assert max(np.abs(a - b).max() for a, b in zip(target.values, batch_statistics.values)) > 1e-3
    attacker = model_lib.AttackerModel(model_lib.ServerView.from_model(victim), "none")
    predicted = targets.simulate(attacker, target, tf.constant(x), tf.constant(y), tf.zeros([0]))
    for p, t in zip(predicted, target.values):
        np.testing.assert_allclose(p.numpy(), t, atol=1e-5)
    with pytest.raises(ValueError, match="training mode"):
        cases.simulate_clients(victim, x, y, 1, "update", training=False, batch_size=1)


def test_simulated_local_steps_reproduce_a_captured_update(tmp_path):
    victim = _victim(True)
    x, y = _images(4)
    capture = cases.client_update_capture(victim, x, y, str(tmp_path / "c.npz"), batch_size=2, local_epochs=2)
    target = targets.from_capture(capture)
    assert (target.kind, target.num_steps) == ("update", 4)
    view = model_lib.ServerView.from_capture(capture)
    attacker = model_lib.AttackerModel(view, "oracle", secret=model_lib.extract_secret(victim))
    predicted = targets.simulate(attacker, target, tf.constant(x), tf.constant(y), tf.zeros([0]))
    for p, t in zip(predicted, target.values):
        np.testing.assert_allclose(p.numpy(), t, atol=1e-6)


def test_server_view_holds_nothing_private():
    victim = _victim(True)
    view = model_lib.ServerView.from_model(victim)
    secret_names = {v.name for v in private.private_variables(victim)}
    assert secret_names and not secret_names & set(view.names)
    secret_values = [v.numpy() for v in private.private_variables(victim)]
    for value in secret_values:
        assert not any(w.shape == value.shape and np.array_equal(w, value) for w in view.weights)
    assert 'key"' not in view.model_json.replace("key_dim", "")  # the config carries no key


def test_with_a_private_lock_adaptive_key_knows_only_model_fns_lock_weights():
    victim = _victim(True)
    server_known = cases.privatize_lock(victim, seed=5)
    (model_fns,) = model_lib.extract_lock_weights(_victim(True)).values()
    (known,) = server_known.values()
    (own,) = model_lib.extract_lock_weights(victim).values()
    for k, m, o in zip(known, model_fns, own):
        np.testing.assert_array_equal(k, m)  # what the server knows: model_fn's lock weights
        assert not np.array_equal(o, m)  # not the client's
    assert cases.threat_secret("adaptive-key", victim, server_known) is server_known
    (oracle,) = cases.threat_secret("oracle", victim, server_known).values()
    for a, b in zip(oracle[1:], own):
        np.testing.assert_array_equal(a, b)  # the oracle holds the client's own secret


def test_only_the_oracle_gets_a_secret_and_others_never_read_the_victim():
    victim = _victim(True)
    view = model_lib.ServerView.from_model(victim)
    secret = model_lib.extract_secret(victim)
    with pytest.raises(ValueError):
        model_lib.AttackerModel(view, "adaptive", secret=secret)
    with pytest.raises(ValueError):
        model_lib.AttackerModel(view, "oracle")
    with pytest.raises(ValueError):
        model_lib.AttackerModel(view, "none")
    x, y = _images(1)
    target = cases.client_gradient(victim, x, y)
    for variable in private.private_variables(victim):  # poison the victim's secret after capture
        variable.assign(tf.fill(variable.shape, np.nan))
    for threat in ("fixed-key", "adaptive"):
        attacker = model_lib.AttackerModel(view, threat)
        assert all(not np.any(v.numpy()) for v in private.private_variables(attacker.model))
        latent = attacker.initial_lock_latent(1)[0]
        predicted = targets.simulate(attacker, target, tf.constant(x), tf.constant(y), latent)
        assert all(np.all(np.isfinite(p.numpy())) for p in predicted)
        assert labels.infer_labels(attacker, target).tolist() == y.tolist()


@pytest.mark.parametrize("lock,threat", [(False, "none"), (True, "adaptive")])
def test_step_search_finds_which_labels_each_local_step_saw(lock, threat, tmp_path):
    victim = _victim(lock)
    x, _ = _images(8)
    y = np.array([3, 1, 0, 3, 2, 2, 1, 0])  # 4 steps of 2; the counting rule alone cannot order them
    capture = cases.client_update_capture(victim, x, y, str(tmp_path / "c.npz"), batch_size=2)
    target = targets.from_capture(capture)
    attacker = model_lib.AttackerModel(model_lib.ServerView.from_capture(capture), threat)

    def steps(labels):
        return [sorted(labels[s : s + 2]) for s in range(0, 8, 2)]

    hypotheses = labels.step_assignments(attacker, target, 3)
    assert len({tuple(map(tuple, steps(h))) for h in hypotheses}) == 3
    assert steps(hypotheses[0].tolist()) == steps(y.tolist())
    assert steps(labels.infer_labels(attacker, target).tolist()) == steps(y.tolist())


def test_adaptive_key_attacker_knows_the_lock_weights_but_never_the_key():
    victim = _victim(True)
    view = model_lib.ServerView.from_model(victim)
    x, y = _images(1)
    target = cases.client_gradient(victim, x, y)
    lock = private.lock_layers(victim)[0]
    true_key = lock.key.numpy()
    with pytest.raises(ValueError):
        model_lib.AttackerModel(view, "adaptive-key")
    lock.key.assign(tf.fill(lock.key.shape, np.nan))  # the key is never read
    attacker = model_lib.AttackerModel(view, "adaptive-key", secret=model_lib.extract_lock_weights(victim))
    assert attacker.lock_latent_size() == lock.key_dim
    start = attacker.initial_lock_latent(2, seed=1).numpy()
    assert start.shape == (2, lock.key_dim) and np.all(np.abs(start) < 3)
    clipped = np.clip(true_key, 1e-6, 1 - 1e-6)
    latent = tf.constant(np.log(clipped / (1 - clipped)), tf.float32)  # sigmoid(latent) = the true key

    def relative_error(latent):
        predicted = targets.simulate(attacker, target, tf.constant(x), tf.constant(y), latent)
        return np.sqrt(
            sum(np.sum((p.numpy() - t) ** 2) for p, t in zip(predicted, target.values))
            / sum(np.sum(t**2) for t in target.values)
        )

    assert relative_error(latent) < 1e-6
    assert relative_error(tf.fill(latent.shape, -5.0)) > 1e-3  # a key near 0


@pytest.mark.slow
def test_a_full_attack_never_reads_the_victims_secret():
    victim = _victim(True)
    view = model_lib.ServerView.from_model(victim)
    x, y = _images(1)
    target = cases.client_gradient(victim, x, y)
    for variable in private.private_variables(victim):
        variable.assign(tf.fill(variable.shape, np.nan))
    for threat in ("fixed-key", "adaptive"):
        result = attacks.IDLG(model_lib.AttackerModel(view, threat), iterations=5, chunk=5).reconstruct(target)
        assert np.all(np.isfinite(result.raw_images)) and np.isfinite(result.loss)


def test_idlg_label_rule_at_batch_one_and_for_batches():
    victim = _victim(False)
    attacker = model_lib.AttackerModel(model_lib.ServerView.from_model(victim), "none")
    x, _ = _images(8, seed=1)
    for i in range(8):
        label = np.array([i % 4])
        target = cases.client_gradient(victim, x[i : i + 1], label)
        assert labels.infer_labels(attacker, target).tolist() == label.tolist()
    batch_labels = np.array([0, 2, 2, 3])
    target = cases.client_gradient(victim, x[:4], batch_labels)
    assert metrics.label_accuracy(labels.infer_labels(attacker, target), batch_labels) >= 0.75
    update = targets.Target("update", tuple(-0.01 * v for v in target.values), 4, 4)
    assert sorted(labels.infer_labels(attacker, update)) == sorted(labels.infer_labels(attacker, target))


def test_metrics_against_known_values():
    truth = np.zeros((2, 8, 8, 1), np.float32)
    recon = np.full_like(truth, 0.2)
    values = metrics.image_metrics(recon, truth)
    np.testing.assert_allclose(values["mse"], 0.04, rtol=1e-5)
    np.testing.assert_allclose(values["psnr"], 10 * np.log10(1 / 0.04), rtol=1e-5)
    np.testing.assert_allclose(values["paper_rmse"], 51.0)
    np.testing.assert_allclose(values["paper_psnr"], 10 * np.log10(255.0**2 / 51.0), rtol=1e-6)
    truth = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 1)).astype(np.float32)
    same = metrics.image_metrics(truth, truth)
    np.testing.assert_allclose(same["ssim"], 1.0, atol=1e-6)
    assert np.all(np.isinf(same["psnr"]))
    affine = metrics.image_metrics(np.clip(0.5 * truth + 0.2, 0, 1), truth, raw=0.5 * truth + 0.2)
    assert np.all(affine["psnr"] < 20) and np.all(affine["aligned_psnr"] > 60)
    assert metrics.label_accuracy([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)
    assert metrics.match_order(truth[::-1], truth).tolist() == [1, 0]


def _start_psnr(attack, target, truth):
    start = attack._split(attack._initial(target, 1, attack.config.seed)[0], target)[0].numpy()
    return float(metrics.image_metrics(np.clip(start, 0, 1), truth)["aligned_psnr"][0])


@pytest.mark.parametrize(
    "name,options",
    [
        pytest.param("idlg", dict(iterations=150, chunk=150), marks=pytest.mark.slow),
        ("ig", dict(iterations=300, chunk=300, restarts=1, tv=1e-4, signed=False, learning_rate=0.05)),
    ],
)
def test_attacks_recover_images_from_a_gradient(name, options):
    victim = _victim(False, init="dlg")
    x, y = _images(1)
    target = cases.client_gradient(victim, x, y)
    attacker = model_lib.AttackerModel(model_lib.ServerView.from_model(victim), "none")
    attack = experiment.build_attack(name, attacker, **options)
    result = attack.reconstruct(target)
    final = metrics.image_metrics(result.images, x, result.raw_images)["aligned_psnr"][0]
    assert final > _start_psnr(attack, target, x) + 6.0
    assert result.history[-1]["loss"][0] < 1e-3


def test_grnn_trains_its_generator_towards_the_image():
    victim = _victim(False, init="dlg")
    x, y = _images(1)
    target = cases.client_gradient(victim, x, y)
    attacker = model_lib.AttackerModel(model_lib.ServerView.from_model(victim), "none")
    attack = attacks.GRNN(attacker, iterations=300, chunk=150, learning_rate=1e-2, width=16, code_dim=16)
    result = attack.reconstruct(target)
    losses = [h["loss"][0] for h in result.history]
    assert losses[-1] < losses[0]
    final = metrics.image_metrics(result.images, x, result.raw_images)["aligned_psnr"][0]
    assert final > _start_psnr(attack, target, x) + 6.0


@pytest.mark.slow
def test_adaptive_attack_recovers_from_an_update_and_returns_lock_estimates(tmp_path):
    victim = _victim(True)
    x, y = _images(2, seed=4)
    capture = cases.client_update_capture(victim, x, y, str(tmp_path / "c.npz"), batch_size=1)
    target = targets.from_capture(capture)
    attacker = model_lib.AttackerModel(model_lib.ServerView.from_capture(capture), "adaptive")
    assert attacker.lock_latent_size() == 2 * 12
    attack = attacks.IDLG(attacker, iterations=100, chunk=50, restarts=2)
    result = attack.reconstruct(target)
    assert sorted(result.labels.tolist()) == sorted(y.tolist())
    gamma, beta = next(iter(result.info["lock_estimate"].values()))
    assert len(gamma) == len(beta) == 12 and min(gamma) >= 0
    losses = [min(h["loss"]) for h in result.history]
    assert losses[-1] <= losses[0]


def test_grid_png_and_table(tmp_path):
    x, _ = _images(3)
    experiment.save_grid(str(tmp_path / "g.png"), [("truth", x), ("rec", x[::-1])])
    image = tf.io.decode_png(tf.io.read_file(str(tmp_path / "g.png"))).numpy()
    assert image.shape == (2 * (8 + 2) + 2, 3 * (8 + 2) + 2, 3)
    per_image = metrics.image_metrics(x, x[::-1])
    per_image["aligned_ssim"] = [0.9, 0.1, 0.7]
    table = experiment.format_table([("a", dict(per_image, label_accuracy=[1.0] * 3), 1.0)])
    header, _, row = table.splitlines()
    # The success rate leads (aligned SSIM >= 0.6: 2 of 3, Wilson 95 % interval), then the means.
    assert header.index("recovered") < header.index("psnr") and "2/3 = 67 % [21, 94] %" in row


def test_gradient_distances_and_tv():
    a = [tf.constant([1.0, 0.0]), tf.constant([[2.0]])]
    assert float(base.gradient_distance(a, a, "l2")) == 0.0
    assert float(base.gradient_distance(a, a, "cosine")) == pytest.approx(0.0, abs=1e-6)
    b = [-t for t in a]
    assert float(base.gradient_distance(a, b, "cosine")) == pytest.approx(2.0)
    assert float(base.gradient_distance(a, b, "l2")) == pytest.approx(4.0)
    flat = tf.ones((1, 4, 4, 1))
    assert float(base.total_variation(flat)) == 0.0


@pytest.mark.parametrize("attack", ["dlg", "ig", "grnn"])
def test_unknown_distance_is_one_value_error(attack):
    attacker = model_lib.AttackerModel(model_lib.ServerView.from_model(_victim(False)), "none")
    with pytest.raises(ValueError, match="distance must be one of"):
        experiment.build_attack(attack, attacker, distance="cosine-layers")


@pytest.mark.slow
def test_attack_captures_writes_grid_and_table(tmp_path):
    x, y = _images(1)
    paths = {}
    for name, lock in (("fedavg", False), ("fedkl", True)):
        path = str(tmp_path / f"{name}.npz")
        cases.client_update_capture(_victim(lock), x, y, path, batch_size=1)
        paths[name] = path
    results = experiment.attack_captures(
        paths,
        str(tmp_path / "out"),
        attack="idlg",
        attack_options=dict(iterations=20, chunk=20),
        truth_images=x,
        truth_labels=y,
        verbose=False,
    )
    assert set(results) == {"fedavg/none", "fedkl/fixed-key", "fedkl/adaptive"}
    assert (tmp_path / "out" / "captures_grid.png").stat().st_size > 100
    assert "aligned_psnr" in (tmp_path / "out" / "captures_table.txt").read_text()
    assert all(r["success"]["n"] == 1 and r["success"]["recovered"] in (0, 1) for r in results.values())
    with pytest.raises(ValueError):
        experiment.attack_captures(paths, str(tmp_path / "out"), locked_threats=("oracle",))


def test_soft_label_loss_matches_the_client_loss_and_passes_second_order_gradients():
    logits = tf.constant([[0.3, -1.0, 2.0, 0.1]])
    one_hot_logits = tf.constant([[-40.0, -40.0, 40.0, -40.0]])
    hard = targets.client_loss(tf.constant([2]), logits)
    np.testing.assert_allclose(float(targets.client_loss(one_hot_logits, logits)), float(hard), rtol=1e-5)
    label_logits = tf.zeros((1, 4))
    with tf.GradientTape() as outer:
        outer.watch(label_logits)
        with tf.GradientTape() as inner:
            inner.watch(logits)
            loss = targets.client_loss(label_logits, logits)
        distance = tf.reduce_sum(tf.square(inner.gradient(loss, logits)))
    assert float(tf.reduce_max(tf.abs(outer.gradient(distance, label_logits)))) > 0


def _dlg_problem():
    victim = _victim(False, init="dlg")
    x, y = _images(1)
    attacker = model_lib.AttackerModel(model_lib.ServerView.from_model(victim), "none")
    return attacker, cases.client_gradient(victim, x, y), x, y


@pytest.mark.parametrize(
    "optimizer,iterations,chunks", [pytest.param("tfp", 12, (12, 5), marks=pytest.mark.slow), ("torch", 4, (200, 7))]
)
def test_dlg_chunks_do_not_change_the_path(optimizer, iterations, chunks):
    attacker, target, _, y = _dlg_problem()
    results = [
        attacks.DLG(
            attacker, iterations=iterations, chunk=chunk, optimizer=optimizer, label_mode="given", distance="l2_sum"
        ).reconstruct(target, labels=y[None])
        for chunk in chunks
    ]
    np.testing.assert_array_equal(results[0].raw_images, results[1].raw_images)
    assert results[0].info["evaluations"] == results[1].info["evaluations"]
    assert len(results[1].history) > len(results[0].history)


def test_tfp_lbfgs_resumes_on_the_same_path():
    def rosenbrock(positions):
        with tf.GradientTape() as tape:
            tape.watch(positions)
            x, y = positions[:, 0], positions[:, 1]
            values = tf.square(1.0 - x) + 100.0 * tf.square(y - tf.square(x))
        return values, tape.gradient(values, positions)

    finals = []
    attacker, target = _dlg_problem()[:2]
    base._shared_functions.clear()  # the compiled L-BFGS of this structure must call this objective
    for chunk in (40, 3):
        attack = attacks.DLG(attacker, iterations=40, chunk=chunk)
        start = tf.constant([[-1.2, 1.0], [0.5, -0.5]])
        advance, done, finished = attack._tfp_chunks(target, lambda p: rosenbrock(p), start, ()), 0, False
        while done < 40 and not finished:
            done, positions, _, evaluations, finished = advance()
        finals.append((positions.numpy(), evaluations))
    base._shared_functions.clear()
    np.testing.assert_array_equal(finals[0][0], finals[1][0])
    assert finals[0][1] == finals[1][1]
    np.testing.assert_allclose(finals[0][0], 1.0, atol=1e-3)


def test_dlg_monitor_sees_each_chunk_and_stops_the_search():
    attacker, target, x, y = _dlg_problem()
    seen, pause = [], 0.05

    def monitor(snapshot):
        time.sleep(pause)  # the monitor's time is not the search's
        seen.append((snapshot.evaluations, snapshot.seconds, snapshot.images[0].copy()))
        return len(seen) == 3

    attack = attacks.DLG(attacker, iterations=50, chunk=10, optimizer="torch", label_mode="given", distance="l2_sum")
    result = attack.reconstruct(target, labels=y[None], monitor=monitor)
    assert [s[0] for s in seen] == [10, 20, 30] and result.info["evaluations"] == 30
    np.testing.assert_array_equal(seen[-1][2], result.raw_images)
    assert 0 < seen[0][1] < seen[1][1] < seen[2][1] == result.info["optimizer_seconds"]
    assert result.info["optimizer_seconds"] + 3 * pause <= result.info["seconds"]


@pytest.mark.parametrize(
    "attack,options",
    [("idlg", dict(iterations=4, chunk=2)), pytest.param("ig", dict(iterations=4, chunk=2), marks=pytest.mark.slow)],
)
def test_threats_of_one_structure_share_one_compiled_attack(attack, options):
    """'oracle' and 'fixed-key' differ in the lock weights only: the second threat runs the first's traces (fed its
    own weights as arguments), and finds what an attack compiled afresh finds."""
    victim = _victim(True)
    x, y = _images(2)
    payload, _ = cases.simulate_clients(victim, x, y, 1)

    def attack_under(threat):
        secret = cases.threat_secret(threat, victim)
        return experiment.run_attack(attack, payload, threat, secret, attack_options=options)[0]

    def traces():
        return sum(f.experimental_get_tracing_count() for f in base._shared_functions.values())

    base._shared_functions.clear()
    oracle = attack_under("oracle")
    compiled, traced = len(base._shared_functions), traces()
    assert traced == compiled  # each function traced once, though called from several places
    shared = attack_under("fixed-key")
    assert (len(base._shared_functions), traces()) == (compiled, traced)
    base._shared_functions.clear()
    fresh = attack_under("fixed-key")
    for a, b in zip(shared, fresh):
        np.testing.assert_array_equal(a.raw_images, b.raw_images)
        assert a.loss == b.loss
    assert not np.array_equal(oracle[0].raw_images, shared[0].raw_images)  # its own weights, not the oracle's


def test_traces_do_not_grow_with_the_threats_and_reused_attacks_find_what_fresh_ones_find():
    """The binary's four threats, twice over, trace each compiled function once: three structures (the plain
    model, known lock weights, adaptive), each an objective and an L-BFGS. The second pass, all reused, finds bit
    for bit what the first found, where 'none', 'oracle' and 'adaptive' compiled afresh; and 'fixed-key', which
    reused the oracle's functions, finds what an attack compiled for it alone finds."""
    victims = {"plain": _victim(False), "locked": _victim(True)}
    x, y = _images(2)
    payloads = {name: cases.simulate_clients(victim, x, y, 1)[0] for name, victim in victims.items()}
    threats = ("none", "oracle", "fixed-key", "adaptive")

    def attack_under(threat):
        victim = "plain" if threat == "none" else "locked"
        secret = cases.threat_secret(threat, victims[victim])
        options = dict(iterations=4, chunk=2)
        return experiment.run_attack("idlg", payloads[victim], threat, secret, attack_options=options)[0]

    def assert_same(a, b):
        for first, second in zip(a, b):
            np.testing.assert_array_equal(first.raw_images, second.raw_images)
            assert first.loss == second.loss

    base._shared_functions.clear()
    first, second = ({threat: attack_under(threat) for threat in threats} for _ in range(2))
    traces = [f.experimental_get_tracing_count() for f in base._shared_functions.values()]
    assert traces == [1] * 6  # 3 structures x (objective, L-BFGS), whatever the number of threats run
    for threat in threats:
        assert_same(first[threat], second[threat])
    base._shared_functions.clear()
    assert_same(attack_under("fixed-key"), first["fixed-key"])
    base._shared_functions.clear()
