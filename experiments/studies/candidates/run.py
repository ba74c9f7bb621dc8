"""The candidates' parts, run: the LeNet and ResNet-20 training runs (cached with their commands), the attack
cells (one process each, one record per image, resumable) and the train-step overhead."""

import dataclasses
import functools
import json
import os
import tempfile

import numpy as np

from experiments import cells, common
from experiments.studies import adaptive_attacker, key_table
from experiments.studies.candidates import (
    CANDIDATES,
    DATASET,
    MODEL,
    RESNET,
    UPDATE,
    UPDATE_ATTACKS,
    UPDATE_TRAINING,
    batch_cells,
    candidate_of,
    cell,
    follow_up_cells,
    holding,
    lenet_commands,
    num_images,
    records,
    resnet_commands,
)


def _root_dir(argv):
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--root_dir="))


def run_training(names, seeds, run_dir, parts, log, run=True):
    """Runs (or resumes) the LeNet and ResNet-20 training runs of `parts`; returns {part: {name: {seed:
    row}}}. With run=False only what is cached already, nothing runs."""
    results = {"lenet": {}, "resnet": {}}
    cells = [("lenet", name, seed) for seed in seeds for name in ["control", *names]]
    cells += [("resnet", name, RESNET["seed"]) for name in ["control", *names]]
    for part, name, seed in cells:
        if part not in parts:
            continue
        train, evaluate, out = (
            lenet_commands(name, seed, run_dir) if part == "lenet" else resnet_commands(name, run_dir)
        )
        doc = key_table.run_cached([train, evaluate], out, log) if run else key_table.cached_doc([train, evaluate], out)
        if doc is None:
            continue
        row = key_table.row_of(doc, key_table.SETTING["public_sizes"] if part == "lenet" else ())
        row["round_seconds"] = key_table.round_seconds(_root_dir(train))
        results[part].setdefault(name, {})[seed] = row
    return results


def victim_payload(name, seed, images, labels, input_shape, num_classes, capture_dir=None):
    """(the server's payload of `name`'s clients; the victim; the lock weights a server knows, model_fn's):
    the victims of experiments.studies.adaptive_attacker (weights of `seed`, key of seed + 1), built with the
    candidate's options. Each client sends one image's gradient, or with `capture_dir` the update of
    UPDATE's local epoch over its images; pruned targets carry `pruned` (the attacker knows the protocol)."""
    from attacks import cases
    from tfkl import keys, models
    from tfkl.federated import algorithms

    candidate = candidate_of(name)
    options = dict(init="pytorch", seed=seed)
    if candidate.locked:
        key = keys.generate_key(1024, seed=seed + 1, distribution=candidate.key_distribution)
        options.update(key=key, **candidate.victim)
    victim = models.build(MODEL, input_shape, num_classes, lock=candidate.locked, **options)
    server_lock_weights = None
    if candidate.lock_init == "private":
        server_lock_weights = cases.privatize_lock(victim, seed)
    if capture_dir is None:
        payload, _ = cases.simulate_clients(victim, images, labels, 1)
    else:
        payload, _ = cases.simulate_clients(
            victim, images, labels, UPDATE["images_per_client"], "update", capture_dir, **UPDATE_TRAINING
        )
    if candidate.prune_fraction:
        prune = algorithms.prune_smallest(candidate.prune_fraction)
        targets = tuple(
            dataclasses.replace(t, values=tuple(v.numpy() for v in prune(list(t.values))), pruned=True)
            for t in payload.targets
        )
        payload = dataclasses.replace(payload, targets=targets)
    return payload, victim, server_lock_weights


def run_cell(run_dir, name, attack, seed, threat=None, log=print):
    """Attacks the cell's images not cached yet (one batched call; update cells whole clients) and caches
    each image's metrics: under 'adaptive' (a candidate) or 'none' (a reference), or under `threat`:
    'oracle' (the victim's key and lock given: does the attack work on this configuration at all?) or
    'adaptive-key' (model_fn's lock weights known, the key optimised: a round-1 server when clients start
    from model_fn's lock). Update cells are given each local step's labels (the order oracle)."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    this = cell(name, attack, seed, threat)
    attack_images = functools.partial(_attack_clients, name, attack, seed, threat, log)
    cells.run_pending(records(run_dir), this, range(num_images(attack)), attack_images, log=log)


def _attack_clients(name, attack, seed, threat, log, missing):
    """Yields (image, record) for every image of the clients that hold a `missing` image, attacked together."""
    from attacks import cases, study

    update = attack in UPDATE_ATTACKS
    per_client = UPDATE["images_per_client"] if update else 1
    clients = sorted({i // per_client for i in missing})
    indices = [c * per_client + k for c in clients for k in range(per_client)]
    data_set, input_shape, images, labels = study.load_images(DATASET, MODEL, num_images(attack))
    images, labels = images[indices], labels[indices]
    with tempfile.TemporaryDirectory() as capture_dir:
        payload, victim, server_lock_weights = victim_payload(
            name, seed, images, labels, input_shape, data_set.num_classes, capture_dir if update else None
        )
    cell_threat, _, strategy = (threat or ("adaptive" if candidate_of(name).locked else "none")).partition(":")
    secret = cases.threat_secret(cell_threat, victim, server_lock_weights)
    options = dict(UPDATE_ATTACKS.get(attack) or adaptive_attacker.BASE_OPTIONS[attack])
    options.update({"adaptive_strategy": strategy} if strategy else {})
    given = labels.reshape(len(clients), per_client) if update else None

    def progress(done, total, losses):
        log(f"[{name}/{attack}/{cell_threat}/seed {seed}] {done}/{total} best loss median {np.median(losses):.3g}")

    entries = adaptive_attacker.attack_entries(
        attack.split("-")[0], payload, cell_threat, secret, options, seed, images, labels, progress, per_client, given
    )
    for image, entry in zip(indices, entries):
        entry.pop("lock_estimate")  # a spatial lock's is 6,144 numbers per image
        yield image, dict(entry, threat=threat or cell_threat)


def run_attacks(names, seeds, run_dir, log, workers=cells.DEFAULT_WORKERS):
    """Runs every missing attack cell, each in its own process in the engine's pool (a killed run resumes per
    image): the batch-1 cells, then those that depend on which candidates hold there."""
    try:
        cells.run_jobs([attack_job(run_dir, *c) for c in batch_cells(names, seeds)], workers, log)
        held = holding(names, seeds, run_dir)
        cells.run_jobs([attack_job(run_dir, *c) for c in follow_up_cells(names, seeds, held)], workers, log)
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None


def attack_job(run_dir, name, attack, seed, threat):
    """The pool's job attacking one cell (`--cand_cell`) unless all its images are stored."""
    argument = f"{name}|{attack}|{seed}" + (f"|{threat}" if threat else "")
    return cells.cell_job(
        records(run_dir),
        cell(name, attack, seed, threat),
        range(num_images(attack)),
        cells.module_command("experiments.studies.candidates", f"--cand_cell={argument}", f"--cand_dir={run_dir}"),
        os.path.join(run_dir, "logs", argument.replace("|", "_").replace(":", "_") + ".log"),
        name=f"attack cell {argument}",
    )


# -- overhead: train-step time over the control's, interleaved -------------------------------------
def measure_overhead(names, run_dir, steps=20, repeats=15, log=print):
    """Median seconds per LeNet train step (batch 64, 32x32x1, the clients' SGD) of each candidate's model
    and of the control's, timed interleaved in this process (`common.interleaved_timings`; candidates with
    the same model, such as those differing in keys or pruning only, share one measurement); written to
    run_dir/overhead.json."""
    import tensorflow as tf

    from tfkl import models, optimizers, training

    tf.get_logger().setLevel("ERROR")  # one trace per model, not a retracing problem
    where = {"first-two": 2, "all": "all"}
    builds = {"control": dict(lock=False, control=True)}
    for name in names:
        options = dict(lock=True, **CANDIDATES[name].victim)
        for flag in CANDIDATES[name].train_flags:
            if flag.startswith("--lock_where="):
                options["where"] = where[flag.split("=")[1]]
        builds[name] = options
    models_of = {}  # one measurement per distinct model
    for name, options in builds.items():
        models_of.setdefault(json.dumps(options, sort_keys=True), []).append(name)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((64, 32, 32, 1)), tf.float32)
    y = tf.constant(rng.integers(0, 10, 64))
    loss_fn = training.classification_loss()
    step_fns = {}
    for key in models_of:
        model = models.build(MODEL, (32, 32, 1), 10, init="pytorch", seed=0, **json.loads(key))
        optimizer = optimizers.TorchSGD(0.01, 0.9, True, 5e-4)
        variables = model.trainable_variables
        state = optimizer.initialize([tf.TensorSpec(v.shape, v.dtype) for v in variables])

        @tf.function
        def step(model=model, variables=variables, optimizer=optimizer, state=state):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            _, new = optimizer.next(state, variables, tape.gradient(loss, variables))
            for variable, value in zip(variables, new):
                variable.assign(value)
            return loss

        step_fns[key] = step
    times = common.interleaved_timings(step_fns, repeats, steps, warmup_steps=2, rng=np.random.default_rng(0))
    seconds = {name: float(np.median(times[key])) for key, group in models_of.items() for name in group}
    result = {
        "seconds_per_step": seconds,
        "ratio_to_control": {name: seconds[name] / seconds["control"] for name in names},
        "steps": steps,
        "repeats": repeats,
        "git_commit": common.git_commit(),
    }
    common.write_json(os.path.join(run_dir, "overhead.json"), result)
    log("overhead: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["ratio_to_control"].items()))
    return result
