"""The regimes' cells, attacked: each seed's victims (untrained, or a training run's global model), the attack
per chunk of clients with its record written as it comes, and the engine's pool over cells."""

import functools
import glob
import os
import resource
import sys
import time

import numpy as np

from experiments import cells
from experiments.studies.regimes import (
    DATASET,
    ORDER_ORACLE,
    REGIMES,
    cell,
    cell_dir,
    layout,
    load_dataset,
    named_cell,
    nothing_to_measure,
    pending_clients,
    reconstruction_path,
    seed_images,
    threat_model,
)


def _victim(regime, seed, threat, input_shape, store):
    """(victim model, secret under `threat`) of a seed: the backbone without the lock for 'none' and the
    order oracle, with it otherwise (its lock drawn privately for 'adaptive-key-private'); for T regimes the
    global model of the training run (see `load_trained`)."""
    from attacks import cases

    attacker_threat = threat_model(threat)
    victims = cases.build_victims(
        regime.model, input_shape, 10, "pytorch", seed, key_seed=seed + 1, threats=(attacker_threat,)
    )
    victim = victims["plain" if attacker_threat == "none" else "locked"]
    server_lock_weights = None
    if regime.round is not None:
        server_lock_weights = load_trained(victim, store.work, regime.round)
    elif threat == "adaptive-key-private":
        server_lock_weights = cases.privatize_lock(victim, seed=seed + 2)
    return victim, cases.threat_secret(attacker_threat, victim, server_lock_weights)


TRAIN_FLAGS = (
    "--dataset=fashion_mnist",
    "--model=lenet",
    "--num_clients=3",  # as experiments.studies.table1: its FedAvg reaches 76 % in 10 rounds
    "--rounds=20",
    "--capture_rounds=1,5,20",
    "--seeded_keys",
    "--keep_rounds=25",
    "--seed=0",
)


def train_dir(work_dir, algorithm):
    return os.path.join(work_dir, "train", algorithm)


def train_runs(store, data_dir=None, log=print):
    """The FedAvg and FedKL runs whose global models the T regimes attack (tff_programs.train, resumable), one
    after the other in the engine's pool."""
    jobs = []
    for algorithm in ("fedavg", "fedkl"):
        root = train_dir(store.work, algorithm)
        command = cells.module_command("tff_programs.train", f"--root_dir={root}", f"--algorithm={algorithm}")
        command += list(TRAIN_FLAGS) + ([f"--data_dir={data_dir}"] if data_dir else [])
        done = functools.partial(_round_captures, root, 20)
        announce = f"== training {algorithm} for the T regimes ({root})"
        jobs.append(cells.Job(f"the {algorithm} training run", command, f"{root}_log.txt", done, announce=announce))
    cells.run_jobs(jobs, workers=1, log=log)


PRIOR_LATENT_DIM = 32


def prior_decoder(store, model_name, data_dir=None, log=print):
    """The prior attack's decoder for `model_name`'s inputs: trained on the test split (which no client trains
    on; `attacks.prior.train_decoder`, seed 0) the first time, then loaded from under store.work."""
    from attacks import prior
    from tfkl import data, models

    dataset = load_dataset(data_dir)
    input_shape = models.input_shape(model_name, dataset)
    shape = "x".join(str(d) for d in input_shape)
    path = os.path.join(store.work, "prior", f"{DATASET}_{shape}_latent{PRIOR_LATENT_DIM}.weights.h5")
    if os.path.exists(path):
        decoder = prior.build_decoder(input_shape, PRIOR_LATENT_DIM)
        decoder.load_weights(path)
        return decoder
    log(f"== training the prior attack's decoder on the test split ({path})")
    decoder = prior.train_decoder(data.preprocess(dataset.x_test, input_shape).numpy(), PRIOR_LATENT_DIM, log=log)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path[: -len(".weights.h5")] + ".partial.weights.h5"
    decoder.save_weights(partial)
    os.replace(partial, path)
    return decoder


def _round_captures(root, round_num):
    return sorted(glob.glob(os.path.join(root, "captures", f"round_{round_num:05d}_client_*.npz")))


def load_trained(victim, work_dir, round_num):
    """Sets `victim` to the global model the run's clients received in `round_num` (FedAvg's run for the
    plain victim, FedKL's for the locked one, whose key and lock become those of the round's first captured
    client). Returns model_fn's lock weights (all a server knows of them; None for the plain victim)."""
    from attacks import model as model_lib
    from tfkl import capture as capture_lib
    from tfkl import private
    from tfkl.federated.client_store import ClientStore

    locks = private.lock_layers(victim)
    root = train_dir(work_dir, "fedkl" if locks else "fedavg")
    paths = _round_captures(root, round_num)
    if not paths:
        raise RuntimeError(f"{root} has no capture of round {round_num}: run the training runs first")
    capture = capture_lib.load_capture(paths[0])
    for variable, value in zip(private.shared_variables(victim), capture.global_weights, strict=True):
        variable.assign(value)
    if not locks:
        return None
    clients = ClientStore(os.path.join(root, "clients"))
    initial = clients.load(0)[capture.meta["client_id"]]
    state = clients.load(round_num - 1)[capture.meta["client_id"]]
    lock_weights = [
        w for lock in locks for w in (lock.scale_kernel, lock.scale_bias, lock.shift_kernel, lock.shift_bias)
    ]
    for variable, value in zip(lock_weights, state["lock"], strict=True):
        variable.assign(value)
    for lock in locks:
        lock.key.assign(state["key"][0])
    server_known = [np.asarray(w) for w in initial["lock"]]
    weights = model_lib.extract_lock_weights(victim)
    return {name: tuple(server_known[4 * i : 4 * i + 4]) for i, name in enumerate(weights)}


def _case(regime, seed, threat, store, capture_dir, data_dir=None):
    """(payload, true data, secret) of a seed's clients under `threat`; updates are written to `capture_dir`."""
    from attacks import cases

    input_shape, images, labels = seed_images(regime, seed, data_dir)
    victim, secret = _victim(regime, seed, threat, input_shape, store)
    kind, n = regime.kind, regime.images_per_client
    payload, truth = cases.simulate_clients(
        victim, images, labels, n, kind, capture_dir, regime.training, **regime.update_options()
    )
    return payload, truth, secret


def run_cell(regime, seed, threat, store, data_dir=None, log=print):
    """Attacks the pending clients of one cell and stores each client's result (metrics and reconstruction)."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    this, clients = cell(regime, seed, threat), range(regime.clients)
    if store.cells.complete(this, clients):
        return
    os.makedirs(cell_dir(store.work, regime.name, seed, threat), exist_ok=True)
    attack_clients = _client_attack(regime, seed, threat, store, data_dir, log)
    cells.run_pending(store.cells, this, clients, attack_clients, regime.clients_per_call, log)


def _client_attack(regime, seed, threat, store, data_dir, log):
    """The cell's case and attack, built once; returns what attacks a chunk of its clients and yields (client,
    result) for each (`_result`)."""
    from attacks import experiment, prior
    from attacks import labels as labels_lib
    from attacks import model as model_lib

    captures = os.path.join(cell_dir(store.work, regime.name, seed, threat), "captures")
    payload, truth, secret = _case(regime, seed, threat, store, captures, data_dir)
    n = regime.images_per_client
    attacker = model_lib.AttackerModel(payload.view, threat_model(threat), secret=secret, seed=seed + 7)
    options = dict(regime.attack_options(), seed=seed)
    searched = regime.kind == "update" and threat != ORDER_ORACLE  # labels from the shared step search
    if threat == ORDER_ORACLE or searched:
        options["label_mode"] = "given"
    if regime.attack == "prior":
        attack = prior.GenerativePrior(attacker, prior_decoder(store, regime.model, data_dir, log), **options)
    else:
        attack = experiment.build_attack(regime.attack, attacker, **options)

    def attack_clients(clients):
        counted = {}
        if threat == "none" and n > 1:  # the counting rule alone, before any attack (see `table._count_rule_row`)
            plain = model_lib.AttackerModel(payload.view, "none")
            counted = {c: labels_lib.count_labels(plain, payload.targets[c]).tolist() for c in clients}
        given = None
        if threat == ORDER_ORACLE:  # the labels of each local step, in the order the client trained
            given = np.stack([truth.labels[c * n : (c + 1) * n] for c in clients])
        elif searched:
            given = np.stack(
                [step_labels(store, regime, seed, threat, attacker, payload.targets[c], c) for c in clients]
            )
        curves = {c: [] for c in clients}
        start = time.perf_counter()
        reconstructions = attack.reconstruct(
            [payload.targets[c] for c in clients],
            labels=given,
            progress=_progress(log, regime.name, seed, threat, clients),
            monitor=_budget_curve(curves, regime, truth),
        )
        seconds = (time.perf_counter() - start) / len(clients)
        for client, rec in zip(clients, reconstructions):
            extra = dict(budget_curve=curves[client], count_rule_labels=counted.get(client))
            yield client, _result(store, regime, seed, threat, client, rec, truth, seconds, len(clients), extra, log)

    return attack_clients


def step_labels(store, regime, seed, threat, attacker, target, client):
    """The step search's labels of a client's update (`attacks.labels.infer_labels`), shared by the regimes of
    its case (`Regime.case`: U16, U16-GRNN and U16-prior attack the same updates), which would each find the
    same: taken from a record of one of them, or from under store.work where a search keeps them as soon as it
    ends; the search runs only where neither has them."""
    from attacks import labels as labels_lib

    searched = cells.RecordStore(os.path.join(store.work, "step_labels"), layout, "client_{:02d}.json", indent=None)
    siblings = [r.name for r in REGIMES.values() if r.case == regime.case and r.name != regime.name]
    places = [(store.cells, named_cell(name, seed, threat)) for name in siblings]
    for records, stored in places + [(searched, named_cell(regime.case, seed, threat))]:
        if records.has(stored, client):
            return np.asarray(records.read(stored, client)["step_labels"], np.int64)
    labels = labels_lib.infer_labels(attacker, target)
    searched.write(named_cell(regime.case, seed, threat), client, dict(step_labels=labels.tolist()))  # as a record
    return labels


def _budget_curve(curves, regime, truth):
    """A monitor that records, between chunks, each client's aligned SSIMs at the restart its loss prefers
    (what the attack would return if stopped there). It reads the truth to score, never to steer: it
    returns False, so the search runs its whole budget."""
    from attacks import metrics

    n, restarts = regime.images_per_client, regime.restarts

    def monitor(snapshot):
        for index, client in enumerate(curves):
            losses = snapshot.losses[index * restarts : (index + 1) * restarts]
            raw = snapshot.images[index * restarts + int(np.argmin(losses))]
            true_images = truth.images[client * n : (client + 1) * n]
            _, scores = metrics.match_and_score(np.clip(raw, 0, 1), true_images, raw)
            curves[client].append([int(snapshot.done), [float(v) for v in scores["aligned_ssim"]]])
        return False

    return monitor


def _result(store, regime, seed, threat, client, rec, truth, seconds, chunk_size, extra, log):
    """Scores one client's reconstruction (Hungarian-matched to its true images), saves it under store.work and
    returns its record, with `extra`: its budget curve ([iterations done, aligned SSIM per image] between chunks)
    and under 'none' the labels the counting rule gives alone."""
    from attacks import metrics

    n = regime.images_per_client
    true_images, true_labels = truth.images[client * n : (client + 1) * n], truth.labels[client * n : (client + 1) * n]
    order, scores = metrics.match_and_score(rec.images, true_images, rec.raw_images)
    per_image = {k: [float(v) for v in a] for k, a in scores.items()}
    result = dict(
        regime=regime.name,
        seed=seed,
        threat=threat,
        client=client,
        per_image=per_image,
        true_labels=true_labels.tolist(),
        recovered_labels=np.sort(rec.labels).tolist(),
        label_accuracy=metrics.label_accuracy(rec.labels, true_labels),
        label_counts_exact=bool(np.array_equal(np.sort(rec.labels), np.sort(true_labels))),
        step_labels=rec.labels.tolist(),  # in the order the attack assumed the client trained
        seconds=seconds,
        iterations=rec.info["iterations"],
        optimizer_seconds=rec.info["optimizer_seconds"] / chunk_size,  # the optimiser's time, compiling excluded
        restart_losses=rec.info["restart_losses"],
        **extra,
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # the cell's process so far
    )
    np.save(reconstruction_path(store, regime.name, seed, threat, client), rec.raw_images[order])
    ssim = ", ".join(f"{v:.2f}" for v in per_image["aligned_ssim"])
    log(f"{regime.name} seed {seed} {threat} client {client}: aligned SSIM {ssim} ({seconds:.0f} s)")
    return result


def _progress(log, regime, seed, threat, clients):
    def progress(done, total, losses):
        if done % 500 == 0 or done == total:
            log(
                f"{regime} seed {seed} {threat} clients {clients}: {done}/{total} iterations, loss {np.min(losses):.4g}"
            )

    return progress


def _cell_command(regime, seed, threat, store, data_dir):
    command = [sys.executable, "-m", "experiments.studies.regimes", f"--cell={regime}/{seed}/{threat}"]
    command += [f"--records_dir={store.records}", f"--out_dir={store.work}"]
    return command + ([f"--data_dir={data_dir}"] if data_dir else [])


def run_cells(regimes, seeds, threats, store, data_dir=None, parallel=cells.DEFAULT_WORKERS, log=print):
    """Runs every pending cell in its own process (memory stays that of one cell) in the engine's pool,
    `parallel` at a time, threat by threat in the order of `threats` (all regimes under 'none' first: the
    targets; a threat's cells start once the threats before it are done), except where a threat would measure
    nothing (`nothing_to_measure`). Raises RuntimeError naming the first cell that fails, once the others are
    done."""
    for threat in threats:
        jobs = []
        for regime in [r for r in regimes if threat in r.threats]:
            needed = nothing_to_measure(store, regime, seeds, threat, data_dir)
            if needed and any(pending_clients(store, regime, s, threat) for s in seeds):
                log(f"== {regime.name} {threat}: not run, {needed} recovers no more images than the labels alone")
                continue
            commands = [(_cell_command(regime.name, seed, threat, store, data_dir), seed) for seed in seeds]
            jobs += [cell_job(command, regime, seed, threat, store) for command, seed in commands]
        cells.run_jobs(jobs, parallel, log)


def cell_job(command, regime, seed, threat, store):
    """The pool's job running `command`, which attacks one cell, unless the cell is done; its output goes to
    the cell's log.txt under store.work."""
    return cells.cell_job(
        store.cells,
        cell(regime, seed, threat),
        range(regime.clients),
        command,
        os.path.join(cell_dir(store.work, regime.name, seed, threat), "log.txt"),
        name=f"cell {regime.name}/{seed}/{threat}",
        announce=f"== {regime.name} seed {seed} {threat}",
    )
