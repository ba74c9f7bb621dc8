"""Key-lock candidates for claim (a), side by side against the strongest adaptive attacker.

  python -m experiments.studies.candidates  # every part, resumable (hours)
  python -m experiments.studies.candidates --cand_parts=attacks     # one part
  python -m experiments.studies.candidates --cand_tabulate_only     # the table and the figure from what is cached

Candidates: the paper's lock (conv1, batch norm, model_fn's lock weights), a private lock init, locks
on the first two convs and on every conv (local statistics), group norm in the lock, a spatial lock
(gamma/beta per position and channel: 2 x 16 x 16 x 12 unknowns against a 32 x 32 image), the paper's
lock with 90 % update pruning, the paper's lock with gaussian keys (section 2's best key), and the spatial
lock with gaussian keys, with model_fn's and with private lock weights. Parts:

- lenet: LeNet Fashion-MNIST, 3 clients, 20 rounds, seeds 0-2 (experiments.studies.key_table's runs, whose
  cache the paper's, gaussian and control rows share): own-key accuracy against the FedAvg control
  (`--algorithm=fedavg-norm`), random key + own lock, lock recovery minus from scratch at 100 examples.
- resnet: ResNet-20 on digits, 3 clients, 10 rounds, seed 0, local statistics for FedKL (ResNet-20
  normalises after the lock), averaged for the control: own-key accuracy against the control.
- attacks: batch-1 gradients of the untrained LeNet (images 0-9 of Fashion-MNIST, victims of seeds 0-2,
  experiments.studies.adaptive_attacker's), GRNN and Inverting Gradients (the two strongest adaptive attacks)
  under 'adaptive' with each attack's strongest strategy at every seed, the candidates that hold also under
  'oracle' and 'adaptive-key' at the first seed, and under 'none' (no lock) with and without pruning as
  references; then U8 updates of the same victims (images 0-15, 2 clients of 8, each step's labels given:
  an order oracle) under IG, and under GRNN for the references and the candidates that hold. One process
  per (configuration, attack, seed, threat) cell, one cache file per image.
- overhead: seconds per LeNet train step (batch 64) of each candidate's model over the control's,
  interleaved in one process.

Writes results/candidates.json, .md and docs/figures/candidates_frontier.png. Ship target: adaptive success
<= 5 % with the Wilson upper bound <= 15 % for every attack in every regime where the unprotected client leaks
>= 50 %, own-key accuracy within 1 pp of the control, random key <= chance + 10 pp.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags
import numpy as np

from experiments import cells, common, runtime
from experiments.studies import adaptive_attacker, key_table

NAME = "candidates"
DATASET, MODEL, NUM_IMAGES = "fashion_mnist", "lenet", 10
ATTACKS = ("grnn", "ig")  # the strongest adaptive attacks (experiments.studies.adaptive_attacker)
# The candidates that hold at batch 1 (`holding`: adaptive GRNN recovers none of their images) also face, at the
# first seed, 'oracle' (does the attack work on them at all?) and 'adaptive-key'; the others lose most images
# under 'adaptive' already. Spatial locks also face the first adaptive attacker's start ('joint': their
# 'relearn' reads no dead channel) and block-coordinate descent (images and lock in turns).
EXTRA_THREATS = ("oracle", "adaptive-key")
SPATIAL_EXTRA_THREATS = ("adaptive:joint", "adaptive:relearn-alternating")
# The multi-step regime U8 of experiments.studies.regimes (one local epoch over 8 images in 4 steps of 2 at the paper's
# lr), attacked with each local step's labels given: an oracle on the order, labelled so (these cells came before
# the step search with which experiments.studies.regimes' U8 attacks find them themselves; not rerun with it). Inverting
# Gradients attacks every configuration; GRNN (with the step labels known the stronger on U8: 71 % against IG's 38 %,
# results/regimes.md) the unprotected client and the candidates that hold.
UPDATE_ATTACKS = {
    f"{attack}-u8": dict(
        adaptive_attacker.BASE_OPTIONS[attack], iterations=2000, restarts=2, label_hypotheses=1, label_mode="given"
    )
    for attack in ("ig", "grnn")
}
UPDATE = dict(clients=2, images_per_client=8)
UPDATE_TRAINING = dict(batch_size=2, local_epochs=1, learning_rate=0.01)
NONE_SUCCEEDS = 0.5  # the ship target holds in every regime where the unprotected client leaks this share
PARTS = ("lenet", "resnet", "attacks", "overhead")
RESNET = dict(model="resnet20", dataset="digits", rounds=10, seed=0)
TARGET_SUCCESS, TARGET_UPPER, TARGET_ACCURACY_PP, TARGET_RANDOM_KEY_PP = 0.05, 0.15, 1.0, 10.0
CHANCE = 0.1


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A configuration: its `tff_programs.train` flags and how the attacked client's model is built."""

    label: str
    train_flags: tuple
    victim: dict = dataclasses.field(default_factory=dict)  # tfkl.models.build options beyond the paper's
    lock_init: str = "shared"
    key_distribution: str = "uniform"
    prune_fraction: float = None
    key_table_config: str = None  # experiments.studies.key_table's configuration with these flags: its runs are shared

    @property
    def locked(self):
        return "--algorithm=fedkl" in self.train_flags


CANDIDATES = {
    "paper": Candidate(
        "paper's lock (conv1, batch norm, shared lock init)",
        ("--algorithm=fedkl", "--key_distribution=uniform"),
        key_table_config="fedkl_uniform",
    ),
    "private_init": Candidate(
        "conv1, private lock init", ("--algorithm=fedkl", "--lock_init=private"), lock_init="private"
    ),
    "first_two": Candidate(
        "locks on conv1 and conv2", ("--algorithm=fedkl", "--lock_where=first-two"), victim=dict(where=2)
    ),
    "every_conv": Candidate(
        "locks on every conv, local statistics",
        ("--algorithm=fedkl", "--lock_where=all", "--statistics=local"),
        victim=dict(where="all"),
    ),
    "group": Candidate(
        "conv1, group norm in the lock (12 groups)",
        ("--algorithm=fedkl", "--normalization=group"),
        victim=dict(normalization="group"),
    ),
    "spatial": Candidate(
        "conv1, spatial lock (gamma/beta per position and channel)",
        ("--algorithm=fedkl", "--lock_affine=spatial"),
        victim=dict(affine="spatial"),
    ),
    "pruned": Candidate(
        "conv1 + 90 % update pruning", ("--algorithm=fedkl", "--prune_fraction=0.9"), prune_fraction=0.9
    ),
    "gaussian": Candidate(
        "conv1, gaussian keys",
        ("--algorithm=fedkl", "--key_distribution=gaussian"),
        key_distribution="gaussian",
        key_table_config="fedkl_gaussian",
    ),
    "spatial_gaussian": Candidate(
        "conv1, spatial lock, gaussian keys",
        ("--algorithm=fedkl", "--lock_affine=spatial", "--key_distribution=gaussian"),
        victim=dict(affine="spatial"),
        key_distribution="gaussian",
    ),
    "spatial_gaussian_private": Candidate(
        "conv1, spatial lock, gaussian keys, private lock init",
        ("--algorithm=fedkl", "--lock_affine=spatial", "--key_distribution=gaussian", "--lock_init=private"),
        victim=dict(affine="spatial"),
        key_distribution="gaussian",
        lock_init="private",
    ),
}
# References: the FedAvg control (accuracy) and the unprotected client (attacks), with and without pruning.
CONTROL = Candidate(
    "FedAvg control (learned affine, no key)", ("--algorithm=fedavg-norm",), key_table_config="fedavg_norm"
)
REFERENCES = {
    "none": Candidate("no defence (attack reference)", ("--algorithm=fedavg",)),
    "none_pruned": Candidate(
        "90 % update pruning alone (attack reference)", ("--algorithm=fedavg",), prune_fraction=0.9
    ),
}

_PARTS = flags.DEFINE_list("cand_parts", list(PARTS), f"Parts to run, from {PARTS}.")
_NAMES = flags.DEFINE_list("cand_names", list(CANDIDATES), f"Candidates, from {list(CANDIDATES)}.")
_SEEDS = flags.DEFINE_list("cand_seeds", ["0", "1", "2"], "Seeds of the LeNet runs and of the attacked victims.")
_RUN_DIR = flags.DEFINE_string("cand_dir", "runs/candidates", "Runs and caches.")
_CELL = flags.DEFINE_string("cand_cell", None, "Internal: run one attack cell 'candidate|attack|seed' here.")
_TABULATE_ONLY = flags.DEFINE_bool("cand_tabulate_only", False, "Run nothing; tabulate the cache.")
_WORKERS = flags.DEFINE_integer(
    "cand_workers", cells.DEFAULT_WORKERS, "Attack cells run at a time, each in its own process.", lower_bound=1
)
flags.register_validator("cand_parts", lambda v: bool(v) and set(v) <= set(PARTS), f"--cand_parts: from {PARTS}")
flags.register_validator(
    "cand_names", lambda v: bool(v) and set(v) <= set(CANDIDATES), f"--cand_names: from {list(CANDIDATES)}"
)
flags.register_validator(
    "cand_seeds", lambda v: bool(v) and all(s.isdigit() for s in v), "--cand_seeds: non-negative integers"
)


def _candidate(name):
    return CANDIDATES.get(name) or REFERENCES.get(name) or {"control": CONTROL}[name]


# -- lenet and resnet: training runs ---------------------------------------------------------------
def lenet_commands(name, seed, run_dir):
    """key_table.commands of candidate `name` (the key table's own run dir when it shares its runs)."""
    candidate = _candidate(name)
    if candidate.key_table_config:
        return key_table.commands(candidate.key_table_config, seed, key_table.SETTING, "runs/key_table")
    return key_table.commands(
        name, seed, key_table.SETTING, os.path.join(run_dir, "lenet"), list(candidate.train_flags)
    )


def resnet_commands(name, run_dir):
    """(train argv, evaluate argv, evaluation JSON) of candidate `name` on ResNet-20 digits: own-key
    accuracy on the whole test split, no lock-recovery entries. FedKL keeps the moving statistics local
    (ResNet-20 normalises after the lock: averaged statistics fit no client, Table 1's 60.9 % vs 98.0 %);
    the control averages them, as FedAvg does (its global model has no per-client statistics to use)."""
    candidate = _candidate(name)
    root = os.path.join(run_dir, "resnet", name)
    extra = [f for f in candidate.train_flags if f != "--statistics=local"]
    extra += ["--statistics=local"] if candidate.locked else []
    train = [
        "tff_programs.train",
        f"--model={RESNET['model']}",
        f"--dataset={RESNET['dataset']}",
        "--num_clients=3",
        f"--rounds={RESNET['rounds']}",
        f"--seed={RESNET['seed']}",
        "--seeded_keys",
        "--keep_rounds=1",
        f"--root_dir={root}",
        *extra,
    ]
    evaluate = ["tff_programs.evaluate", f"--root_dir={root}", "--public_sizes=", f"--out={root}_evaluation.json"]
    return train, evaluate, root + "_evaluation.json"


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


# -- attacks: batch-1 cells, one process each, one cache file per image --------------------------------
def attack_names(names):
    """The attacked configurations: the candidates, then the references."""
    return [*names, *REFERENCES]


def _layout(cell):
    folder = f"{cell.attack}_{cell.threat.replace(':', '_')}" if cell.threat else cell.attack
    return os.path.join("attacks", cell.regime, folder, f"seed{cell.seed}")


def records(run_dir):
    """The attack cells' records (`experiments.cells.RecordStore`): one file per image."""
    return cells.RecordStore(run_dir, _layout, "{:03d}.json", indent=2, trailing_newline=True)


def cell(name, attack, seed, threat=None):
    """The engine's cell of configuration `name`; `threat` None is its own ('adaptive', or 'none' for references)."""
    return cells.Cell(NAME, name, threat, attack, seed)


def image_path(run_dir, name, attack, seed, image, threat=None):
    """A cached image's record."""
    return records(run_dir).path(cell(name, attack, seed, threat), image)


def num_images(attack):
    return UPDATE["clients"] * UPDATE["images_per_client"] if attack in UPDATE_ATTACKS else NUM_IMAGES


def cached_images(run_dir, name, attack, seed, threat=None):
    """{image: record} of a cell's stored images."""
    return records(run_dir).load(cell(name, attack, seed, threat), range(num_images(attack)))


def victim_payload(name, seed, images, labels, input_shape, num_classes, capture_dir=None):
    """(the server's payload of `name`'s clients; the victim; the lock weights a server knows, model_fn's):
    the victims of experiments.studies.adaptive_attacker (weights of `seed`, key of seed + 1), built with the
    candidate's options. Each client sends one image's gradient, or with `capture_dir` the update of
    UPDATE's local epoch over its images; pruned targets carry `pruned` (the attacker knows the protocol)."""
    from attacks import cases
    from tfkl import keys, models
    from tfkl.federated import algorithms

    candidate = _candidate(name)
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
    cell_threat, _, strategy = (threat or ("adaptive" if _candidate(name).locked else "none")).partition(":")
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


def holding(names, seeds, run_dir):
    """The candidates among `names` that hold at batch 1: adaptive GRNN (their own threat), its cells complete
    at every seed, recovers none of their images (aligned SSIM >= 0.6)."""

    def holds(name):
        cells = [cached_images(run_dir, name, "grnn", seed) for seed in seeds]
        complete = all(len(cell) == num_images("grnn") for cell in cells)
        entries = [entry for cell in cells for entry in cell.values()]
        return complete and adaptive_attacker.score(entries)["ssim"]["recovered"] == 0

    return [name for name in names if name in CANDIDATES and holds(name)]


def batch_cells(names, seeds):
    """(name, attack, seed, threat) of the batch-1 cells: each configuration under its own threat, every seed."""
    return [(name, attack, seed, None) for name in attack_names(names) for attack in ATTACKS for seed in seeds]


def follow_up_cells(names, seeds, held):
    """The cells that depend on which candidates hold (`held`): those under the EXTRA_THREATS at the first
    seed, then the update cells."""
    cells = [(name, attack, seeds[0], t) for name in held for t in extra_threats(name) for attack in ATTACKS]
    return cells + [
        (name, attack, seed, None)
        for attack in UPDATE_ATTACKS
        for seed in seeds
        for name in update_names(attack, names, held)
    ]


def update_names(attack, names, held):
    """The configurations attacked by `attack` on updates: the references first (they decide whether the
    regime counts), then every candidate (IG) or those that hold at batch 1 (GRNN)."""
    return [*REFERENCES, *(n for n in names if attack == "ig-u8" or n in held)]


def extra_threats(name):
    """The threats a candidate that holds is attacked under at the first seed, beside its own."""
    spatial = CANDIDATES[name].victim.get("affine") == "spatial"
    return EXTRA_THREATS + (SPATIAL_EXTRA_THREATS if spatial else ())


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


# -- the table and the frontier --------------------------------------------------------------------
def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _pct(value, signed=False):
    return "n/a" if value is None else (f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}")


def tabulate(names, seeds, run_dir, training, overhead):
    """The payload of results/candidates.json from what the parts produced (missing parts show n/a): the attack
    cells' records (`attack_scores`), the training runs' rows and the overhead, per configuration a summary
    (`configuration_summary`) and a table row (`table_row`)."""
    success, extra = attack_scores(names, seeds, run_dir)
    held = holding(names, seeds, run_dir)
    lenet, resnet = training["lenet"], training["resnet"]
    control = _mean([r["own"] for r in lenet.get("control", {}).values()])
    resnet_control = _mean([r["own"] for r in resnet.get("control", {}).values()])
    sizes = key_table.SETTING["public_sizes"]
    rows, key_rows, summary = [], [], {}
    for name in ["control", *attack_names(names)]:
        runs = list(lenet.get(name, {}).values())
        figures = None
        if runs:
            key_row, figures = key_table.table_row(_candidate(name).label, runs, sizes, CHANCE)
            key_rows.append(key_row)
        summary[name] = configuration_summary(name, seeds, training, success, extra.get(name, {}), figures, overhead)
        rows.append(table_row(name, summary[name], lenet, held, resnet_control))
    partial = overhead is None or any(
        summary[name]["meets_target"] is None or summary[name]["resnet_own"] is None for name in names
    )
    title = "Key-lock candidates: adaptive attack success (aligned SSIM >= 0.6) and accuracy"
    if partial:
        title += " (PARTIAL: 'n/a' and 'incomplete' cells wait for `python -m experiments.studies.candidates`)"
    return {
        "settings": _settings(names, seeds),
        "results": dict(
            partial=partial,
            by_configuration=summary,
            control=control,
            resnet_control=resnet_control,
            best_trade_off=_best_trade_off(summary, names),
        ),
        "tables": [
            {"title": title, "columns": _columns(seeds), "rows": rows},
            {
                "title": "The key table of each candidate (LeNet Fashion-MNIST, mean ± std over the seeds, %)",
                "columns": key_table.table_columns(sizes),
                "rows": key_rows,
            },
        ],
        "headline": headline(summary, names),
        "notes": _notes(),
    }


def attack_scores(names, seeds, run_dir):
    """({name: {attack: score over the seeds, with 'complete'}}, {name: {threat: {attack: score at the first
    seed}}}) of every attacked configuration's records."""
    success, extra = {}, {}
    for name in attack_names(names):
        for attack in (*ATTACKS, *UPDATE_ATTACKS):
            stored = [cached_images(run_dir, name, attack, s) for s in seeds]
            entries = [e for images in stored for e in images.values()]
            complete = all(len(images) == num_images(attack) for images in stored)
            if entries:
                success.setdefault(name, {})[attack] = dict(adaptive_attacker.score(entries), complete=complete)
            for threat in EXTRA_THREATS + SPATIAL_EXTRA_THREATS if attack in ATTACKS else ():
                threat_entries = list(cached_images(run_dir, name, attack, seeds[0], threat).values())
                if threat_entries:
                    extra.setdefault(name, {}).setdefault(threat, {})[attack] = adaptive_attacker.score(threat_entries)
    return success, extra


def configuration_summary(name, seeds, training, success, extra, key_figures, overhead):
    """results.by_configuration[name]: attack success, accuracy against the control (paired by seed), the key
    table's figures (`key_figures`, None without runs), the overhead and the ship target's checks."""
    candidate, lenet, resnet = _candidate(name), training["lenet"], training["resnet"]
    control_runs = lenet.get("control", {})
    runs = list(lenet.get(name, {}).values())
    # Paired with the control's run of the same seed: seeds differ more than configurations do.
    paired = [r["own"] - control_runs[s]["own"] for s, r in lenet.get(name, {}).items() if s in control_runs]
    minus_control = _mean(paired)
    all_seeds = len(runs) == len(seeds)
    random_key, gain = (key_figures["random_key"], key_figures["gain"]) if key_figures else (None, None)
    resnet_own = _mean([r["own"] for r in resnet.get(name, {}).values()])
    resnet_control = _mean([r["own"] for r in resnet.get("control", {}).values()])
    by_attack = success.get(name, {})
    checks = dict(
        privacy=privacy_check(by_attack, success.get("none", {})),
        accuracy=None if minus_control is None or not all_seeds else -100 * minus_control <= TARGET_ACCURACY_PP,
        random_key=None if random_key is None or not all_seeds else 100 * (random_key - CHANCE) <= TARGET_RANDOM_KEY_PP,
    )
    return dict(
        label=candidate.label,
        flags=list(candidate.train_flags),
        success=by_attack,
        first_seed_threats=extra,
        lenet_own=_mean([r["own"] for r in runs]),
        lenet_minus_control=minus_control,
        lenet_seeds=len(runs),
        random_key=random_key,
        recovery_minus_scratch_100=gain,
        resnet_own=resnet_own,
        resnet_minus_control=None if resnet_own is None or resnet_control is None else resnet_own - resnet_control,
        step_time_ratio=(overhead or {}).get("ratio_to_control", {}).get(name),
        round_seconds=_mean([r.get("round_seconds") for r in runs]),
        checks=checks,
        meets_target=False if False in checks.values() else (None if None in checks.values() else True),
    )


def _attack_cell(name, attack, by_attack, held):
    if attack in UPDATE_ATTACKS and name in CANDIDATES and name not in update_names(attack, [name], held):
        return "–"
    if attack not in by_attack:
        return "n/a"
    score = by_attack[attack]
    return (
        f"{score['ssim']['recovered']}/{score['n']} = "
        f"{100 * score['ssim']['rate']:.0f} % [{100 * score['ssim']['low']:.0f}, "
        f"{100 * score['ssim']['high']:.0f}]" + ("" if score["complete"] else " (partial)")
    )


def table_row(name, entry, lenet, held, resnet_control):
    """The candidates table's row of configuration `name` from its summary `entry`."""
    attack_cells = [_attack_cell(name, attack, entry["success"], held) for attack in (*ATTACKS, *UPDATE_ATTACKS)]
    extra_cells = [
        ", ".join(
            f"{a.upper()} {e['ssim']['recovered']}/{e['n']}" for a, e in entry["first_seed_threats"].get(t, {}).items()
        )
        or "–"
        for t in EXTRA_THREATS + SPATIAL_EXTRA_THREATS
    ]
    own, runs = entry["lenet_own"], list(lenet.get(name, {}).values())
    own_cell = "n/a"
    if own is not None:
        spread = f" ± {100 * np.std([r['own'] for r in runs]):.1f}" if len(runs) > 1 else ""
        own_cell = f"{100 * own:.1f}{spread} (seeds {', '.join(str(s) for s in sorted(lenet[name]))})"
    resnet_own = entry["resnet_own"]
    resnet_cell = _pct(resnet_own)
    if resnet_own is not None and name != "control" and resnet_control is not None:
        resnet_cell += f" ({100 * (resnet_own - resnet_control):+.1f})"
    ratio = entry["step_time_ratio"]
    verdict = {None: "incomplete", True: "MEETS", False: "no"}[entry["meets_target"]]
    return [_candidate(name).label, *attack_cells, *extra_cells] + [
        own_cell,
        _pct(entry["lenet_minus_control"], True),
        _pct(entry["random_key"]),
        _pct(entry["recovery_minus_scratch_100"], True),
        resnet_cell,
        "n/a" if ratio is None else f"{ratio:.2f}x",
        "–" if name in REFERENCES or name == "control" else verdict,
    ]


def _columns(seeds):
    return [
        "configuration",
        *[f"{a.upper()} adaptive: recovered, n, [95 % CI]" for a in ATTACKS],
        *[
            f"{a.split('-')[0].upper()} adaptive, U8, step labels known (oracle): recovered, n, [95 % CI]"
            for a in UPDATE_ATTACKS
        ],
        f"oracle, seed {seeds[0]} (does the attack work?)",
        f"adaptive-key, seed {seeds[0]} (model_fn's lock known)",
        f"adaptive, 'joint' starts, seed {seeds[0]} (spatial locks)",
        f"adaptive, images and lock in turns, seed {seeds[0]} (spatial locks)",
        "LeNet FMNIST own key (%)",
        "- control, same seeds (pp)",
        "random key + own lock (%)",
        "recovery - scratch, 100 (pp)",
        "ResNet-20 digits own key (%) (- control, pp)",
        "train step / control",
        "ship target",
    ]


def _settings(names, seeds):
    return dict(
        attacks={a: adaptive_attacker.BASE_OPTIONS[a] for a in ATTACKS},
        attack_images=f"Fashion-MNIST training images 0-{NUM_IMAGES - 1}, batch 1, untrained LeNet",
        update_attacks=dict(
            options=UPDATE_ATTACKS,
            client_training=UPDATE_TRAINING,
            images=f"Fashion-MNIST training images 0-{num_images(next(iter(UPDATE_ATTACKS))) - 1}",
            **UPDATE,
        ),
        seeds=[int(s) for s in seeds],
        lenet=dict(
            key_table.SETTING, public_sizes=list(key_table.SETTING["public_sizes"]), clients=key_table.NUM_CLIENTS
        ),
        resnet=RESNET,
        candidates={n: list(_candidate(n).train_flags) for n in ["control", *attack_names(names)]},
        targets=dict(
            adaptive_success=TARGET_SUCCESS,
            wilson_upper=TARGET_UPPER,
            accuracy_pp=TARGET_ACCURACY_PP,
            random_key_pp_over_chance=TARGET_RANDOM_KEY_PP,
        ),
    )


def _notes():
    return [
        "Attacks: batch-1 single-step gradients of the untrained LeNet (PyTorch init; seeds set the victim's "
        "weights, its key is seed + 1's), the same 10 images for every seed, so n = 10 images x seeds counts "
        "attacks. 'adaptive': gamma/beta unknown and optimised with the image, each attack's strongest strategy "
        "(attacks.base: 'relearn'); restarts are chosen by the attack's own loss. The references are attacked "
        "under 'none' (no lock). Pruned targets are matched on their kept entries only.",
        f"U8 updates: each client trains one local epoch over {UPDATE['images_per_client']} images in steps of "
        f"{UPDATE_TRAINING['batch_size']} (SGD lr {UPDATE_TRAINING['learning_rate']}, "
        f"experiments.studies.regimes' U8) on the same victims, {UPDATE['clients']} clients per seed; the attack "
        "simulates the steps and is given each step's labels (an oracle on the order; these cells came before the "
        "step search with which experiments.studies.regimes' U8 attacks find the labels themselves); "
        "reconstructions are Hungarian-matched to the client's images. IG attacks every configuration, GRNN the "
        "references and the candidates that hold at batch 1 ('–': not run). The ship target applies to a regime "
        "(batch 1, U8) only where the "
        f"unprotected client leaks at least {100 * NONE_SUCCEEDS:.0f} % to some attack, and then to every attack.",
        "Accuracy: mean over the LeNet seeds of each client's own key and lock (entry a of "
        "tff_programs.evaluate); the control is `--algorithm=fedavg-norm` (the lock blocks replaced by a learned "
        f"affine, no key). ResNet-20 digits: {RESNET['rounds']} rounds, seed {RESNET['seed']}, local statistics "
        "for FedKL, averaged for the control, the whole test split.",
        "Train step / control: median seconds per LeNet train step (batch 64) over the control's, measured in "
        "turns in one process (experiments.studies.candidates' overhead part); the spatial lock's kernels are "
        "1024 x 3072 each.",
        "Key table: tff_programs.evaluate's entries as in results/key_table.md (the paper's, gaussian and "
        "control rows are that table's runs).",
        "A configuration ships only if it meets every target; the privacy target is checked per attack. The best "
        "trade-off (results.best_trade_off) is the candidate with the lowest worst-attack success among those "
        "within 1 pp of the control, else the lowest overall.",
        common.SHARED_MACHINE_NOTE,
    ]


def privacy_check(by_attack, reference):
    """Whether a candidate meets the privacy target under every attack of every regime (batch 1, U8) where the
    unprotected client (`reference`'s cells) leaks at least NONE_SUCCEEDS to some attack; None while a cell
    this needs is incomplete."""
    verdicts = []
    for attacks in (ATTACKS, tuple(UPDATE_ATTACKS)):
        leaks = [reference.get(a) for a in attacks]
        known = [leak for leak in leaks if leak and leak["complete"]]
        if not any(leak["ssim"]["rate"] >= NONE_SUCCEEDS for leak in known):
            verdicts += [] if len(known) == len(attacks) else [None]  # the regime does not count (or is not known yet)
            continue
        for attack in attacks:
            cell = by_attack.get(attack)
            verdicts.append(
                None
                if not (cell and cell["complete"])
                else cell["ssim"]["rate"] <= TARGET_SUCCESS and cell["ssim"]["high"] <= TARGET_UPPER
            )
    return False if False in verdicts else (None if None in verdicts else True)


def headline(summary, names):
    """Per candidate: the stronger attack's adaptive success and the accuracy against the control, with the targets."""
    lines = []
    for name in names:
        entry = summary[name]
        if entry["success"]:
            attack, worst = max(entry["success"].items(), key=lambda item: item[1]["ssim"]["rate"])
            lines.append(
                dict(
                    metric=f"{name}: recovered under adaptive by the stronger attack ({attack}), n = {worst['n']}",
                    value=round(100 * worst["ssim"]["rate"], 1),
                    unit="%",
                    target=f"<= {100 * TARGET_SUCCESS:.0f} %, Wilson upper <= {100 * TARGET_UPPER:.0f} %",
                    met=entry["checks"]["privacy"],
                )
            )
        if entry["lenet_minus_control"] is not None:
            lines.append(
                dict(
                    metric=f"{name}: LeNet accuracy minus the FedAvg control (seeds: {entry['lenet_seeds']})",
                    value=round(100 * entry["lenet_minus_control"], 1),
                    unit="pp",
                    target=f">= -{TARGET_ACCURACY_PP:g} pp",
                    met=entry["checks"]["accuracy"],
                )
            )
    return lines


def _best_trade_off(summary, names):
    """The candidate with the lowest worst-attack adaptive success among those within 1 pp of the control
    (else among all measured); None when no candidate has both figures."""

    def worst(name):
        rates = [e["ssim"]["rate"] for e in summary[name]["success"].values()]
        return max(rates) if rates else None

    measured = [n for n in names if worst(n) is not None and summary[n]["lenet_minus_control"] is not None]
    close = [n for n in measured if -100 * summary[n]["lenet_minus_control"] <= TARGET_ACCURACY_PP]
    pool = close or measured
    return min(pool, key=lambda n: (worst(n), -summary[n]["lenet_minus_control"])) if pool else None


def frontier_figure(payload, path, x_min=-8.0):
    """The privacy-accuracy frontier: each candidate's worst-attack adaptive success over the batch-1 and U8
    cells (Wilson interval) against its LeNet accuracy minus the control's (candidates below `x_min` pp drawn
    at the edge, their value in the label); the references' success as lines; the ship region shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = payload["results"]["by_configuration"]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.add_patch(
        plt.Rectangle((-TARGET_ACCURACY_PP, 0), TARGET_ACCURACY_PP + 1, 100 * TARGET_SUCCESS, color="green", alpha=0.15)
    )
    ax.text(0.05, 100 * TARGET_SUCCESS + 1, "ship targets", fontsize=7, color="green")
    stacked = {}  # points at the same place get their labels one above the other
    references = {}  # rate -> the references' labels, drawn as one line each
    for name, entry in summary.items():
        if not entry["success"]:
            continue
        worst_attack, worst = max(entry["success"].items(), key=lambda item: item[1]["ssim"]["rate"])
        rate = 100 * worst["ssim"]["rate"]
        if name in REFERENCES:
            references.setdefault(round(rate), []).append(entry["label"])
            continue
        if entry["lenet_minus_control"] is None:
            continue
        x = 100 * entry["lenet_minus_control"]
        shown = max(x, x_min)
        low, high = 100 * worst["ssim"]["low"], 100 * worst["ssim"]["high"]
        ax.errorbar(
            shown,
            rate,
            yerr=[[max(0.0, rate - low)], [max(0.0, high - rate)]],
            fmt="<" if x < x_min else "o",
            capsize=3,
        )
        slot = stacked.setdefault((round(2 * shown), round(rate / 10)), [])
        label = f"{name} ({worst_attack.upper()})" + (f", {x:+.0f} pp" if x < x_min else "")
        ax.annotate(label, (shown, rate), textcoords="offset points", xytext=(6, 4 + 10 * len(slot)), fontsize=7)
        slot.append(name)
    for rate, labels in references.items():
        ax.axhline(rate, color="grey", linestyle=":", linewidth=1)
        ax.text(x_min + 0.1, rate - 4, f"{' / '.join(labels)}: {rate} %", fontsize=7, color="grey")
    ax.set_xlim(x_min - 0.3, 1.0)
    ax.set_ylim(-3, 118)
    ax.set_xlabel("LeNet Fashion-MNIST accuracy minus the FedAvg control (pp, paired by seed, mean)")
    ax.set_ylabel("recovered by the strongest attack, adaptive (%)")
    ax.set_title(
        "Key-lock candidates: privacy (batch 1 and U8 with step labels known) against accuracy; Wilson 95 %",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    log = functools.partial(print, flush=True)
    run_dir = _RUN_DIR.value
    if _CELL.value:
        name, attack, seed, *threat = _CELL.value.split("|")
        run_cell(run_dir, name, attack, int(seed), threat[0] if threat else None, log=log)
        return
    seeds, names, parts = [int(s) for s in _SEEDS.value], _NAMES.value, _PARTS.value
    start = time.perf_counter()
    overhead_path = os.path.join(run_dir, "overhead.json")
    try:
        if not _TABULATE_ONLY.value:
            run_training(names, seeds, run_dir, [p for p in parts if p in ("lenet", "resnet")], log)
            if "attacks" in parts:
                run_attacks(names, seeds, run_dir, log, _WORKERS.value)
            if "overhead" in parts:
                measure_overhead(names, run_dir, log=log)
        training = run_training(names, seeds, run_dir, ("lenet", "resnet"), log, run=False)
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: {' '.join(e.cmd[2:4])} failed (exit {e.returncode}); see the log next to its root dir")
    overhead = None
    if os.path.exists(overhead_path):
        with open(overhead_path) as f:
            overhead = json.load(f)
    payload = tabulate(names, seeds, run_dir, training, overhead)

    try:
        path, markdown = cells.publish(NAME, payload, time.perf_counter() - start, run_dir)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    figure = os.path.join(common.FIGURES_DIR, f"{NAME}_frontier.png")
    os.makedirs(common.FIGURES_DIR, exist_ok=True)
    frontier_figure(payload, figure)
    print(f"wrote {path}, {markdown} and {figure}")


if __name__ == "__main__":
    runtime.run(main)
