"""Attacks where federated clients really train: batches, multi-step updates, trained models, ResNet-20.

  python -m experiments.studies.regimes                          # every regime, seed and threat (resumable)
  python -m experiments.studies.regimes --regimes=G8,U8 --threats=none,oracle --seeds=0
  python -m experiments.studies.regimes --tabulate_only          # tables and grids from all that is stored

Regimes (LeNet and ResNet-20 untrained unless stated, Fashion-MNIST, Inverting Gradients unless stated):
  G8   one single-step gradient of a batch of 8 (labels counted from the last layer)
  U8   a FedAvg client update: 1 local epoch over 8 images in 4 steps of 2 (lr 0.01, the paper's SGD)
  U16  the same over 16 images in 4 steps of 4
  T<r>, T<r>-U8  batch 1 / U8 on the global model a real tff_programs.train run sends its clients in round r
       (captured in the capture format; round 1 is the initial model)
  R    ResNet-20 (32x32), batch 1 (a short budget: see the budget curve in the results)
  R-inference  R with the client's gradient in inference mode (BatchNorm by its moving statistics), as
       Inverting Gradients computes its victims' gradients (`model.eval()`)
  G8-GRNN, U8-GRNN, U16-GRNN  G8, U8 and U16 attacked by GRNN instead (the same images, victims and labels): the
       stronger attack at batch 1, and on G8 and U8 (step labels known) in a pilot on other images (seed 5)
  U16-prior  U16 attacked by attacks.prior (a stronger attacker: it holds public images of the clients'
       distribution, the test split, and trains a decoder on them; latent search, then pixel refinement)
  R-inference-prior  R-inference attacked by attacks.prior (its latent search with IG's cosine distance)
  R-inference-latent  R-inference-prior's latent search alone (no pixel refinement)
Each seed sets the victim's weights, key and lock (T regimes: those of the training run, seed 0), the
attack's starts, and which images (distinct per seed). Every cell (regime, seed, threat) runs in its own
process and stores each client's result as soon as it is attacked: a small JSON record under --records_dir
(kept in the repository: the tables are made from the records alone, so a fresh clone re-tabulates them), the
rest (reconstructions, captured updates, logs, grids, training runs) under --out_dir. A rerun skips the clients
whose record is stored, so a killed run loses at most the clients being attacked. The regimes that attack the
same updates (U16, U16-GRNN and U16-prior; U8 and U8-GRNN) share the step search's labels, from each other's
records or from under --out_dir: it runs once per client and threat. `order-oracle` (U only) is `none` with
the true labels of each local step given: an oracle, labelled so. Restarts are chosen by the attack's
loss, never by the truth.
"""

import dataclasses
import functools
import glob
import json
import os
import re
import resource
import sys
import time

from absl import flags
import numpy as np

from experiments import cells, common, runtime

NAME = "regimes"
DATASET = "fashion_mnist"
ATTACK_THREATS = ("none", "oracle", "fixed-key", "adaptive", "adaptive-key", "adaptive-key-private")
ORDER_ORACLE = "order-oracle"
LABEL_FLOOR_KEY = "label_floor"  # beside the threats in the JSON's results: see `label_floor`
LABEL_FLOOR = "labels alone: class mean (a floor)"
BEYOND_FLOOR = "beyond_floor"  # a success criterion: see `beyond_floor`
THREAT_LABELS = {
    "adaptive-key-private": "adaptive-key (private lock)",
    ORDER_ORACLE: "none, known step order (oracle)",
    LABEL_FLOOR_KEY: LABEL_FLOOR,
}


@dataclasses.dataclass(frozen=True)
class Regime:
    """What a victim client sends and how it is attacked.

    `images_per_client` images per client, `clients` clients per seed; kind 'gradient' (one step on all of
    them) or 'update' (one local epoch in batches of `batch_size`); `round`: the victim is the global model a
    tff_programs.train run sends its clients in that round (see `load_trained`; None: untrained, per seed);
    `training`: the client's gradient in training mode (BatchNorm by the batch's statistics) or not (see
    `attacks.targets.Target.training`); `tv`: Inverting Gradients' total-variation weight; `distance`: the
    attack's gradient distance (one of `attacks.base.DISTANCES`; None: the attack's own default);
    `latent_iterations`: the prior attack's iterations in latent space (None: its default, three quarters)."""

    name: str
    description: str
    images_per_client: int
    clients: int
    kind: str = "gradient"
    batch_size: int = 0
    model: str = "lenet"
    round: int | None = None
    attack: str = "ig"
    iterations: int = 2000
    restarts: int = 4
    training: bool = True
    tv: float = 1e-4
    label_hypotheses: int = 4  # restarts assume the most plausible label counts (batches; see attacks.labels)
    clients_per_call: int = 10
    distance: str | None = None
    latent_iterations: int | None = None

    def __post_init__(self):
        if self.latent_iterations is not None and self.attack != "prior":
            raise ValueError(f"{self.name}: latent_iterations applies to the prior attack only")
        if self.kind == "update" and self.label_hypotheses != 1:
            raise ValueError(
                f"{self.name}: an update's attack takes the step search's best labels (label_hypotheses=1)"
            )

    @property
    def images_per_seed(self):
        return self.images_per_client * self.clients

    @property
    def case(self):
        """What decides a seed's clients and their updates under a threat: regimes of one case attack the same."""
        mode = "training" if self.training else "inference"
        shape = f"{self.images_per_client}x{self.clients}"
        return f"{self.model}_{self.kind}_{shape}_batch{self.batch_size}_round{self.round}_{mode}"

    @property
    def threats(self):
        # A trained run's clients started from model_fn's lock: 'adaptive-key' is the private-lock case there.
        threats = ATTACK_THREATS if self.round is None else ATTACK_THREATS[:-1]
        return threats + ((ORDER_ORACLE,) if self.kind == "update" else ())

    def update_options(self):
        return dict(batch_size=self.batch_size, local_epochs=1, learning_rate=0.01) if self.kind == "update" else {}

    def attack_options(self):
        options = dict(iterations=self.iterations, restarts=self.restarts, label_hypotheses=self.label_hypotheses)
        if self.distance is not None:
            options["distance"] = self.distance
        if self.latent_iterations is not None:
            options["latent_iterations"] = self.latent_iterations
        return dict(dict(tv=self.tv, learning_rate=0.1) if self.attack == "ig" else {}, **options)


# Update regimes: which labels each local step saw is unknown; the attacks take the step search's best labels
# (`attacks.labels.step_assignments`: the client's steps replayed on blank images, scored on the logits layer)
# in both restarts, as the order oracle takes the true ones.
UNKNOWN_ORDER = dict(restarts=2, label_hypotheses=1)


def _regimes():
    regimes = [
        Regime("G8", "one gradient of a batch of 8", 8, 2, iterations=3000),
        # 4 restarts: with 2, about half of GRNN's restarts stopped at a loss of 0.4-1.0 against ~1e-5 (the
        # attacker sees it), both on one of 6 clients (the 2-restart cells: runs/regimes_grnn_2restarts/).
        Regime("G8-GRNN", "G8, attacked by GRNN", 8, 2, iterations=3000, restarts=4, attack="grnn"),
        Regime("U8", "update: 8 images, 4 steps of 2", 8, 2, "update", 2, **UNKNOWN_ORDER),
        Regime("U8-GRNN", "U8, attacked by GRNN", 8, 2, "update", 2, attack="grnn", **UNKNOWN_ORDER),
        Regime("U16", "update: 16 images, 4 steps of 4", 16, 1, "update", 4, **UNKNOWN_ORDER),
        Regime("U16-GRNN", "U16, attacked by GRNN", 16, 1, "update", 4, attack="grnn", **UNKNOWN_ORDER),
        Regime(
            "U16-prior",
            "U16, attacked through a decoder trained on public images",
            16,
            1,
            "update",
            4,
            attack="prior",
            **UNKNOWN_ORDER,
        ),
    ]
    for round_num in (1, 5, 20):
        regimes.append(
            Regime(
                f"T{round_num}",
                f"batch 1, global model of round {round_num}",
                1,
                10,
                round=round_num,
                iterations=1500,
                restarts=2,
            )
        )
        regimes.append(
            Regime(
                f"T{round_num}-U8",
                f"U8 on the global model of round {round_num}",
                8,
                2,
                "update",
                2,
                round=round_num,
                **UNKNOWN_ORDER,
            )
        )
    resnet = dict(model="resnet20", iterations=2000, restarts=1, clients_per_call=2)
    regimes.append(Regime("R", "ResNet-20 32x32, batch 1", 1, 10, **resnet))
    regimes.append(
        Regime("R-inference", "R, the client's BatchNorm in inference mode", 1, 10, training=False, **resnet)
    )
    # The prior's latent search with IG's cosine: on 4 victims of seed 5 (outside the table) it recovered 2,
    # with GRNN's distance (U16-prior's) 1.
    prior_resnet = dict(resnet, attack="prior", distance="cosine", restarts=2, clients_per_call=5)
    regimes.append(
        Regime(
            "R-inference-prior",
            "R-inference, attacked through a decoder trained on public images",
            1,
            10,
            training=False,
            **prior_resnet,
        )
    )
    # Its latent search alone: R-inference-prior's budget curve (the table's seeds) peaked at the latent stage's
    # end; the rule to add this regime was fixed before seeds 5-6 (outside the table) were run, where it held
    # 4/20 against 3/20 after refinement, the labels alone 4/20 (results/regimes_heldout.md).
    regimes.append(
        Regime(
            "R-inference-latent",
            "R-inference-prior, its latent search only (no pixel refinement)",
            1,
            10,
            training=False,
            **dict(prior_resnet, iterations=1500, latent_iterations=1500),
        )
    )
    return {r.name: r for r in regimes}


REGIMES = _regimes()

_REGIMES = flags.DEFINE_list(
    "regimes", list(REGIMES), "Regimes to run, in order (the tables cover every regime and threat stored)."
)
# The tables' column order, and the order cells run in (all regimes under 'none' first: the targets).
THREAT_ORDER = ("none", "oracle", ORDER_ORACLE, "adaptive", "fixed-key", "adaptive-key", "adaptive-key-private")

_THREATS = flags.DEFINE_list(
    "threats", list(THREAT_ORDER), "Threats to run, in this order (per regime: those that apply)."
)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (victim weights, key, lock, images, attack starts).")
_RECORDS_DIR = flags.DEFINE_string(
    "records_dir",
    os.path.join(common.RESULTS_DIR, "regimes_cells"),
    "Where each client's result record goes (small JSON files kept in the repository; the tables' only input).",
)
_OUT_DIR = flags.DEFINE_string(
    "out_dir", "runs/regimes", "Where reconstructions, captured updates, logs, grids and the training runs go."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the data sets are (default: tfkl.data's).")
_PARALLEL = flags.DEFINE_integer(
    "parallel_cells",
    cells.DEFAULT_WORKERS,
    "Cells run at a time, each in its own process (of one threat; see run_cells).",
    lower_bound=1,
)
_TABULATE_ONLY = flags.DEFINE_bool("tabulate_only", False, "Run nothing: tabulate what is stored.")
_RESULTS_NAME = flags.DEFINE_string(
    "results_name", NAME, "The tables go to results/<this>.json and .md (e.g. one set of records apart)."
)
_CELL = flags.DEFINE_string("cell", None, "Internal: run one cell 'regime/seed/threat' in this process.")
flags.register_validator(
    "regimes",
    lambda v: bool(v) and set(v) <= set(REGIMES),
    f"--regimes takes a comma-separated list from {', '.join(REGIMES)}",
)
flags.register_validator(
    "threats",
    lambda v: bool(v) and set(v) <= set(ATTACK_THREATS) | {ORDER_ORACLE},
    f"--threats takes a comma-separated list from {', '.join(ATTACK_THREATS + (ORDER_ORACLE,))}",
)
flags.register_validator(
    "results_name", lambda v: bool(re.fullmatch(r"[a-z0-9_]+", v)), "--results_name takes [a-z0-9_]+"
)
flags.register_validator(
    "seeds", lambda v: bool(v) and all(s.isdigit() for s in v), "--seeds takes comma-separated non-negative integers"
)


def cell_dir(root, regime, seed, threat):
    return os.path.join(root, regime, f"seed{seed}", threat)


def _layout(cell):
    return cell_dir("", cell.regime, cell.seed, cell.threat)


@dataclasses.dataclass(frozen=True)
class Store:
    """Where cells go: `records` the clients' result records (the tables' only input: `cells`, a
    `experiments.cells.RecordStore`, one record per client), `work` the rest."""

    records: str
    work: str

    @property
    def cells(self):
        return cells.RecordStore(self.records, _layout, "client_{:02d}.json", indent=1)


def cell(regime, seed, threat):
    """The engine's cell of `regime` at `seed` under `threat`."""
    return cells.Cell(NAME, regime.name, threat, regime.attack, seed)


def _named_cell(name, seed, threat):
    return cells.Cell(NAME, name, threat, "", seed)


def client_path(store, regime, seed, threat, client):
    """A client's result record (`regime` its name); written last, it marks the client as done."""
    return store.cells.path(_named_cell(regime, seed, threat), client)


def reconstruction_path(store, regime, seed, threat, client):
    return os.path.join(cell_dir(store.work, regime, seed, threat), f"client_{client:02d}.npy")


def pending_clients(store, regime, seed, threat):
    return store.cells.pending(_named_cell(regime.name, seed, threat), range(regime.clients))


# An evaluation says something about the lock only where the attack recovers images without it and, knowing
# the lock, with it: a threat runs only where the threats it needs recovered more images than the labels alone.
PREREQUISITES = {
    "oracle": ("none",),
    **{t: ("none", "oracle") for t in ("adaptive", "fixed-key", "adaptive-key", "adaptive-key-private")},
}


def nothing_to_measure(store, regime, seeds, threat, data_dir=None):
    """The threat `threat` needs (PREREQUISITES) whose cells over `seeds` are all stored and recovered (aligned
    SSIM >= 0.6) no more images than the labels alone do (`label_floor`): `threat` would measure nothing there
    and is not run. None when it has none such."""
    from attacks import metrics

    for needed in PREREQUISITES.get(threat, ()):
        cells = [load_cell(store, regime, seed, needed) for seed in seeds]
        if all(len(cell) == regime.clients for cell in cells):
            recovered = sum(int(metrics.recovered(r["per_image"]).sum()) for cell in cells for r in cell)
            if recovered <= _floor_recovered(regime, tuple(seeds), data_dir):
                return needed
    return None


@functools.cache
def _floor_recovered(regime, seeds, data_dir):
    return label_floor(regime, seeds, data_dir)["success"]["ssim"]["recovered"]


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

    dataset = _dataset(data_dir)
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


def threat_model(threat):
    """The attacker's threat model behind a regime threat."""
    return {"adaptive-key-private": "adaptive-key", ORDER_ORACLE: "none"}.get(threat, threat)


@functools.cache
def _dataset(data_dir=None):
    """The data set, loaded once per process (tabulating reads it for every regime and seed)."""
    from attacks import study

    return study.load_data(DATASET, data_dir)


def seed_images(regime, seed, data_dir=None):
    """(input shape, images, labels) of a seed: its own `images_per_seed` training images."""
    from attacks import study

    n = regime.images_per_seed
    return study.training_images(_dataset(data_dir), regime.model, n, seed * n)


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
        if threat == "none" and n > 1:  # the counting rule alone, before any attack (see `_count_rule_row`)
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

    searched = cells.RecordStore(os.path.join(store.work, "step_labels"), _layout, "client_{:02d}.json", indent=None)
    siblings = [r.name for r in REGIMES.values() if r.case == regime.case and r.name != regime.name]
    places = [(store.cells, _named_cell(name, seed, threat)) for name in siblings]
    for records, stored in places + [(searched, _named_cell(regime.case, seed, threat))]:
        if records.has(stored, client):
            return np.asarray(records.read(stored, client)["step_labels"], np.int64)
    labels = labels_lib.infer_labels(attacker, target)
    searched.write(_named_cell(regime.case, seed, threat), client, dict(step_labels=labels.tolist()))  # as a record
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


def load_cell(store, regime, seed, threat):
    """The stored client results of a cell, in client order."""
    return list(store.cells.load(_named_cell(regime.name, seed, threat), range(regime.clients)).values())


def _cell_row(regime, threat, seeds, results):
    """(table row, summary) of a cell's clients over its seeds: the success rates and aligned scores as
    experiments.studies.success_rates tabulates them, then the labels, time and memory."""
    from experiments.studies import success_rates

    entry = success_rates.score([r["per_image"] for r in results])
    exact = sum(r["label_counts_exact"] for r in results)
    steps_exact = _steps_exact(regime, results)
    label_accuracy = float(np.mean([r["label_accuracy"] for r in results]))
    seconds_per_image = sum(r["seconds"] for r in results) / entry["n"]
    optimizer_seconds = sum(r["optimizer_seconds"] for r in results)
    iterations_per_second = sum(r["iterations"] for r in results) / optimizer_seconds if optimizer_seconds else None
    peak_rss_gb = max((r["peak_rss_gb"] for r in results if "peak_rss_gb" in r), default=None)
    final_loss = float(np.median([np.nanmin(r["restart_losses"]) for r in results]))  # the restart it returns
    cells = success_rates.row(regime.name, THREAT_LABELS.get(threat, threat), seeds, entry) + [
        f"{100 * label_accuracy:.0f} % ({exact}/{len(results)} exact"
        + ("" if steps_exact is None else f"; every step's labels: {steps_exact}/{len(results)}")
        + ")",
        f"{final_loss:.2g}",
        round(seconds_per_image, 1),
        None if iterations_per_second is None else round(iterations_per_second, 1),
        "not recorded" if peak_rss_gb is None else round(peak_rss_gb, 2),
    ]
    summary = dict(
        _scores(entry),
        clients=len(results),
        seeds=list(seeds),
        label_accuracy=label_accuracy,
        label_counts_exact=exact,
        step_labels_exact=steps_exact,
        final_loss=final_loss,
        seconds_per_image=seconds_per_image,
        iterations_per_second=iterations_per_second,
        peak_rss_gb=peak_rss_gb,
        budget_curve=_pooled_curve(results),
    )
    return cells, summary


def _scores(entry):
    """The success rates and aligned scores of a experiments.studies.success_rates.score entry, for the JSON."""
    return dict(
        n=entry["n"],
        success={criterion: entry[criterion] for criterion in ("ssim", "psnr")},
        **{k: dict(mean=entry[k]["mean"], std=entry[k]["std"]) for k in ("aligned_ssim", "aligned_psnr")},
    )


def _steps_exact(regime, results):
    """Clients whose every local step the attack gave the right labels (update regimes whose results
    record the attack's labels in step order; None otherwise)."""
    from attacks import labels as labels_lib

    if regime.kind != "update" or not all("step_labels" in r for r in results):
        return None
    steps = functools.partial(labels_lib.step_multisets, batch_size=regime.batch_size)
    return sum(steps(r["step_labels"]) == steps(r["true_labels"]) for r in results)


def _pooled_curve(results):
    """{iterations: share of all images with aligned SSIM >= 0.6} at the checkpoints every client reached."""
    from attacks import metrics

    threshold = metrics.CRITERIA["ssim"][1]
    common_points = set.intersection(*(set(point for point, _ in r["budget_curve"]) for r in results))
    return {
        point: float(
            np.mean([v >= threshold for r in results for p, values in r["budget_curve"] if p == point for v in values])
        )
        for point in sorted(common_points)
    }


# After experiments.studies.success_rates' columns (its "setting" being the regime here).
RUN_COLUMNS = [
    "labels right (count vectors exact)",
    "attack's final loss (median)",
    "seconds per image",
    "iterations/s",
    "peak RSS (GB)",
]


def label_floor(regime, seeds, data_dir=None):
    """The success rates and aligned scores of `attacks.study.label_floor` on the images of `seeds`."""
    from experiments.studies import success_rates

    per_image = [_floor_per_image(regime, seed, data_dir) for seed in seeds]
    return dict(_scores(success_rates.score(per_image)), seeds=list(seeds))


@functools.cache
def _floor_per_image(regime, seed, data_dir):
    """{aligned score: [per image]} of `attacks.study.label_floor` on a seed's images, in their order."""
    from attacks import study
    from experiments.studies import success_rates

    input_shape, images, labels = seed_images(regime, seed, data_dir)
    scores = study.label_floor(_test_class_means(input_shape, data_dir), images, labels)
    return {k: scores[k] for k in success_rates.SCORES}


@functools.cache
def _test_class_means(input_shape, data_dir):
    from attacks import study

    return study.test_class_means(_dataset(data_dir), input_shape)


def beyond_floor(regime, stored, data_dir=None):
    """Success rate of the images recovered (aligned SSIM >= 0.6) with an aligned SSIM above their class mean's
    (`label_floor`): the reconstruction shows more of the image than its label. `stored`: {seed: client results}."""
    from attacks import metrics

    key = metrics.CRITERIA["ssim"][0]
    n, flags = regime.images_per_client, []
    for seed, results in stored.items():
        floor = np.asarray(_floor_per_image(regime, seed, data_dir)[key])
        for r in results:
            above = np.asarray(r["per_image"][key], float) > floor[r["client"] * n : (r["client"] + 1) * n]
            flags += list(metrics.recovered(r["per_image"]) & above)
    return metrics.success_rate(flags)


def _sizes_row(regime, data_dir=None):
    """[regime, pixel values per client, numbers in its update (the plain model's trainable weights)]."""
    from tfkl import models

    input_shape = models.input_shape(regime.model, _dataset(data_dir))
    victim = models.build(regime.model, input_shape, 10, lock=False)
    numbers = sum(int(np.prod(v.shape)) for v in victim.trainable_variables)
    pixels = regime.images_per_client * int(np.prod(input_shape))
    return [regime.name, pixels, numbers, float(f"{pixels / numbers:.2g}")]


def _count_rule_row(regime, pairs):
    from attacks import metrics

    exact = sum(np.array_equal(np.sort(rule), np.sort(truth)) for rule, truth in pairs)
    overlap = np.mean([metrics.label_accuracy(rule, truth) for rule, truth in pairs])
    return [regime.name, len(pairs), f"{exact}/{len(pairs)}", f"{100 * overlap:.0f} %"]


def _cost_rows(store, regimes, seeds, threats, data_dir=None):
    """Cells done, their minutes (the clients' wall seconds), minutes per cell and the minutes all cells would
    take (a missing cell at its regime's mean; cells that would measure nothing are not run): per regime, per
    threat over all regimes, and in all."""
    cells = []
    for regime in regimes:
        for threat in [t for t in regime.threats if t in threats]:
            runs = not nothing_to_measure(store, regime, seeds, threat, data_dir)
            cells += [(regime, threat, seed) for seed in seeds if runs or load_cell(store, regime, seed, threat)]
    done, optimizing = {}, {}
    for regime, threat, seed in cells:
        stored = load_cell(store, regime, seed, threat)
        if len(stored) == regime.clients:
            done[regime.name, threat, seed] = sum(r["seconds"] for r in stored) / 60
            optimizing[regime.name, threat, seed] = sum(r["optimizer_seconds"] for r in stored) / 60
    means = {}
    for regime in regimes:
        minutes = [m for (name, _, _), m in done.items() if name == regime.name]
        means[regime.name] = sum(minutes) / len(minutes) if minutes else None

    def row(label, selected):
        keys = [(r.name, t, s) for r, t, s in selected if (r.name, t, s) in done]
        minutes = [done[key] for key in keys]
        missing = [means[r.name] for r, t, s in selected if (r.name, t, s) not in done]
        projected = None if None in missing else round(sum(minutes) + sum(missing))
        per_cell = round(sum(minutes) / len(minutes), 1) if minutes else None
        share = f"{100 * sum(optimizing[key] for key in keys) / sum(minutes):.0f} %" if minutes else None
        return [label, f"{len(minutes)}/{len(selected)}", round(sum(minutes)), per_cell, share, projected]

    present = dict.fromkeys(threat for _, threat, _ in cells)
    return (
        [row(regime.name, [c for c in cells if c[0] is regime]) for regime in regimes]
        + [row(f"all regimes: {THREAT_LABELS.get(t, t)}", [c for c in cells if c[1] == t]) for t in present]
        + [row("all regimes, all threats", cells)]
    )


def tabulate(store, regimes, seeds, threats, data_dir=None, log=print, pooled=None):
    """The results payload over what is stored (`regime_results` per regime), and one labelled grid per regime
    and seed whose reconstructions are under store.work (`draw_grid`); with `pooled` (results/rounds.json's
    results), the rows of regime M (`pooled_rows`) close the first table."""
    results, rows = {}, dict(detail=[], curves=[], counts=[], sizes=[])
    for regime in regimes:
        regime_results(store, regime, seeds, threats, data_dir, results, rows)
        for seed in seeds:
            draw_grid(store, regime, seed, threats, data_dir, log)
    regimes_by_name = {r.name: r for r in regimes}
    threat_order = [t for t in threats if any(t in by_threat for by_threat in results.values())]
    missing = {
        (name, t): _missing_cell(regimes_by_name[name], t, store, seeds, data_dir)
        for name, by_threat in results.items()
        for t in threat_order
        if t not in by_threat
    }

    def threat_cells(name, by_threat, criterion):
        return [_compact_cell(by_threat[t], criterion) if t in by_threat else missing[name, t] for t in threat_order]

    rows["compact"] = [
        [name, regimes_by_name[name].description]
        + [_compact_cell(by_threat[LABEL_FLOOR_KEY]) if LABEL_FLOOR_KEY in by_threat else "does not apply"]
        + threat_cells(name, by_threat, "ssim")
        for name, by_threat in results.items()
    ]
    rows["compact"] += pooled_rows(pooled, threat_order) if pooled else []
    rows["beyond"] = [[name] + threat_cells(name, by_threat, BEYOND_FLOOR) for name, by_threat in results.items()]
    rows["cost"] = _cost_rows(store, regimes, seeds, threats, data_dir)
    return dict(
        settings={
            r.name: dict(dataclasses.asdict(r), update_options=r.update_options(), attack_options=r.attack_options())
            for r in regimes
        },
        results=results,
        tables=_tables(rows, threat_order),
        headline=[
            dict(
                metric=f"{name} {THREAT_LABELS.get(threat, threat)}: recovered (aligned SSIM >= 0.6)",
                value=round(100 * s["success"]["ssim"]["rate"], 1),
                unit="%",
            )
            for name, by_threat in results.items()
            for threat, s in by_threat.items()
        ],
        notes=NOTES[:-1] + [POOLED_NOTE] + NOTES[-1:] if pooled else NOTES,
    )


POOLED_THREATS = {"none": "none", "adaptive": "paper"}  # a threat's column: the row of results/rounds.json in it


def pooled_rows(pooled, threat_order):
    """The first table's rows of regime M (`pooled`: results/rounds.json of experiments.studies.rounds, K captures
    of one client attacked together), one per regime and K: under 'none' the unprotected client, under 'adaptive'
    the paper's lock, each cell the attack that recovers most (named)."""
    table = []
    for regime, by_row in pooled["results"].items():
        counts = sorted({int(k) for row in POOLED_THREATS.values() for a in by_row.get(row, {}).values() for k in a})
        for count in counts:
            cells_ = [_pooled_cell(by_row, threat, count) for threat in threat_order]
            pooling = "one capture" if count == 1 else f"{count} captures pooled"
            description = f"{pooled['settings']['regimes'][regime]}; {pooling} (results/rounds.md)"
            table.append([f"{regime}, K = {count}", description, "not measured", *cells_])
    return table


def _pooled_cell(by_row, threat, count):
    """The cell of `threat`'s row at K = `count`: its attack that recovers most, or why there is none."""
    row = POOLED_THREATS.get(threat)
    if row is None:
        return "does not apply" if threat == ORDER_ORACLE else "not run"
    found = [(a, by_k[str(count)]) for a, by_k in by_row.get(row, {}).items() if str(count) in by_k]
    if not found:
        return "not run"
    attack, rate = max(found, key=lambda item: (item[1]["rate"], item[1]["n"]))
    return f"{_rate_cell(rate)}, {attack.upper()}"


def regime_results(store, regime, seeds, threats, data_dir, results, rows):
    """Adds `regime`'s summaries to `results` ({regime: {threat or LABEL_FLOOR_KEY: summary}}) and its rows to
    `rows`' detail, curves, counts and sizes tables, from its stored cells."""
    counted = [s for s in seeds if load_cell(store, regime, s, "none")]
    if counted:
        results.setdefault(regime.name, {})[LABEL_FLOOR_KEY] = label_floor(regime, counted, data_dir)
        rows["sizes"].append(_sizes_row(regime, data_dir))
    if regime.images_per_client > 1 and counted:
        stored = [r for s in counted for r in load_cell(store, regime, s, "none")]
        rows["counts"].append(_count_rule_row(regime, [(r["count_rule_labels"], r["true_labels"]) for r in stored]))
    for threat in [t for t in regime.threats if t in threats]:
        stored = {seed: load_cell(store, regime, seed, threat) for seed in seeds}
        stored = {seed: r for seed, r in stored.items() if r}
        if not stored:
            continue
        detail, summary = _cell_row(regime, threat, sorted(stored), [r for rs in stored.values() for r in rs])
        summary["success"][BEYOND_FLOOR] = beyond_floor(regime, stored, data_dir)
        rows["detail"].append(detail)
        curve = ", ".join(f"{point}: {100 * rate:.0f} %" for point, rate in summary["budget_curve"].items())
        rows["curves"].append([regime.name, THREAT_LABELS.get(threat, threat), summary["n"], curve])
        results.setdefault(regime.name, {})[threat] = summary


def draw_grid(store, regime, seed, threats, data_dir=None, log=print):
    """A labelled grid of a seed's images and, per threat, their reconstructions, for the cells whose
    reconstructions are under store.work (records alone have none: nothing is drawn)."""
    from attacks import grids

    grid_rows = []
    for threat in [t for t in regime.threats if t in threats]:
        stored = load_cell(store, regime, seed, threat)
        paths = [reconstruction_path(store, regime.name, seed, threat, c) for c in range(regime.clients)]
        if len(stored) != regime.clients or not all(os.path.exists(p) for p in paths):
            continue
        images = np.concatenate([np.load(p) for p in paths])
        per_image = {k: [v for r in stored for v in r["per_image"][k]] for k in ("aligned_psnr", "aligned_ssim")}
        grid_rows.append((THREAT_LABELS.get(threat, threat), images, per_image))
    if grid_rows:
        _, truth, labels = seed_images(regime, seed, data_dir)
        path = os.path.join(store.work, regime.name, f"grid_seed{seed}.png")
        grids.save_labelled_grid(path, truth, grid_rows, truth_labels=labels)
        log(f"grid: {path}")


def _tables(rows, threat_order):
    """The payload's tables from `tabulate`'s rows."""
    from experiments.studies import success_rates

    compact, beyond, detail = rows["compact"], rows["beyond"], rows["detail"]
    cost_rows, count_rows, size_rows, curve_rows = rows["cost"], rows["counts"], rows["sizes"], rows["curves"]
    return [
        dict(
            title="images recovered (aligned SSIM >= 0.6): share [Wilson 95 % interval] (count); first what "
            "the labels alone give (each image's class mean: a floor, not an attack)",
            columns=["regime", "client", LABEL_FLOOR] + [THREAT_LABELS.get(t, t) for t in threat_order],
            rows=compact,
        ),
        dict(
            title="images recovered beyond their labels: aligned SSIM >= 0.6 and above that of the image's class "
            "mean (the floor), per image: share [Wilson 95 % interval] (count)",
            columns=["regime"] + [THREAT_LABELS.get(t, t) for t in threat_order],
            rows=beyond,
        ),
        dict(
            title="attack success by regime and threat (LeNet/ResNet-20, Fashion-MNIST; Hungarian-matched batches)",
            columns=["regime"] + success_rates.COLUMNS[1:] + RUN_COLUMNS,
            rows=detail,
        ),
        dict(
            title="cost: cells done (regime x seed x threat), their time (the clients' wall seconds: label "
            "search, compilation and the attack's optimiser, whose share is given), and the time all cells "
            "would take (a missing cell at its regime's mean); by regime, by threat, in all",
            columns=[
                "cells",
                "cells done",
                "minutes done",
                "minutes per cell",
                "optimiser's share",
                "projected minutes, all cells",
            ],
            rows=cost_rows,
        ),
        dict(
            title="label counts from the last layer by the counting rule alone, under 'none' (batch attacks try "
            "the rule's and the nearest other count vectors as restarts, their loss picks; update attacks use "
            "the step search instead, see the labels column above)",
            columns=["regime", "clients", "count vector exact", "labels right (multiset overlap)"],
            rows=count_rows,
        ),
        dict(
            title="what an update can determine: a client's unknown pixel values against the numbers its update "
            "has (the plain model's trainable weights). Where the pixel values are more, by counting a family "
            "of image sets of at least the difference in dimensions sends the same update: the attack's prior, "
            "not the update, chooses among them",
            columns=["regime", "pixel values per client", "numbers in the update", "pixel values per number"],
            rows=size_rows,
        ),
        dict(
            title="budget curves: images recovered (aligned SSIM >= 0.6) after so many iterations, at the "
            "restart the attack's loss prefers at that point",
            columns=["regime", "threat", "n", "iterations: recovered"],
            rows=curve_rows,
        ),
    ]


def _missing_cell(regime, threat, store, seeds, data_dir=None):
    """Why a table has no result for `threat` on `regime`."""
    if threat not in regime.threats:
        return "does not apply"
    needed = nothing_to_measure(store, regime, seeds, threat, data_dir)
    return f"not run: {THREAT_LABELS.get(needed, needed)} does not beat the floor" if needed else "not run yet"


def _compact_cell(summary, criterion="ssim"):
    """A table cell: the success rate of `summary` (a cell's, or `label_floor`'s) under `criterion`."""
    return _rate_cell(summary["success"][criterion])


def _rate_cell(rate):
    """A success rate (recovered, n, rate, Wilson low/high) as a table cell."""
    interval = f"[{100 * rate['low']:.0f}, {100 * rate['high']:.0f}]"
    return f"**{100 * rate['rate']:.0f} %** {interval} ({rate['recovered']}/{rate['n']})"


NOTES = [
    "recovered: aligned SSIM >= 0.6 (FedKL's threshold), separately aligned PSNR >= 20 dB (Dimitrov et al.'s); "
    "Wilson 95 % intervals over the n images of all seeds. Batches are scored after a one-to-one (Hungarian) "
    "matching of reconstructions to true images by MSE; restarts are chosen by the attack's loss.",
    "Labels: batches counted from the last layer's gradient; multi-step updates by the step search (the client's "
    "steps replayed on blank images with candidate labels, scored on the logits layer); 'labels right' is the "
    "multiset overlap, 'exact' the clients whose whole count vector is right, 'every step's labels' the clients "
    "whose labels the attack put in the right local steps.",
    "order-oracle: 'none' given the true labels of each local step in the client's order: an oracle.",
    "U16-prior and R-inference-prior: a stronger attacker (attacks.prior): it holds public images of the clients' "
    "distribution (the test split) and trains a decoder on them before attacking; its rates are those of a server "
    "with such images.",
    f"{LABEL_FLOOR}: each image replaced by the mean image of its class over the test split (no client trains on "
    "it), scored as a reconstruction: what an attacker that knows only the labels, as every attack here does, "
    "gets without the update. Not an attack; success rates near it show little beyond the labels. 'Beyond their "
    "labels' counts, per image, a recovered image only when its reconstruction's aligned SSIM is above its class "
    "mean's.",
    "A threat facing the lock runs only where the attack recovers more images than the labels alone without the "
    "lock ('none') and, for those that do not know the lock, with it known ('oracle'); elsewhere it would "
    "measure nothing ('not run: none does not beat the floor'). "
    "T regimes: the training run's clients start from model_fn's lock, so 'adaptive-key' is the private-lock case "
    "there ('does not apply').",
    common.SHARED_MACHINE_NOTE,
]
POOLED_NOTE = (
    "M1, M8 (regime M, experiments.studies.rounds): one client of a real training run watched over rounds, its "
    "first K captures attacked together (each capture's images their own unknowns, the lock's shared); 'none' is "
    "the FedAvg control's client, 'adaptive' the paper's lock's, each cell the attack (GRNN or IG) that recovers "
    "most (picked by the measured success: an upper bound on either attack's); the other threats and the "
    "defences beyond the paper's lock are in results/rounds.md."
)


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


def published_pooled(results_dir=common.RESULTS_DIR):
    """results/rounds.json (regime M), or None before that study has published."""
    path = os.path.join(results_dir, "rounds.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def publish_main_table(start, log=print):
    """Tabulates every stored regime of the default seeds with regime M's rows and publishes results/regimes.json
    and .md (what `main` does after its cells; experiments.studies.rounds calls it when its results change)."""
    store = Store(_RECORDS_DIR.value, _OUT_DIR.value)
    seeds = [int(s) for s in _SEEDS.value]
    pooled = published_pooled() if _RESULTS_NAME.value == NAME else None
    payload = tabulate(store, list(REGIMES.values()), seeds, THREAT_ORDER, _DATA_DIR.value, log, pooled)
    return cells.publish(_RESULTS_NAME.value, payload, time.perf_counter() - start, store.records)


def main(argv):
    del argv
    store = Store(_RECORDS_DIR.value, _OUT_DIR.value)
    if _CELL.value:
        name, seed, threat = _CELL.value.split("/")
        run_cell(REGIMES[name], int(seed), threat, store, _DATA_DIR.value, log=lambda line: print(line, flush=True))
        return
    seeds = [int(s) for s in _SEEDS.value]
    regimes = [REGIMES[r] for r in _REGIMES.value]
    start = time.perf_counter()
    try:
        if not _TABULATE_ONLY.value:
            if any(r.round is not None for r in regimes):
                train_runs(store, _DATA_DIR.value)
            for model_name in sorted({r.model for r in regimes if r.attack == "prior"}):  # before parallel cells
                prior_decoder(store, model_name, _DATA_DIR.value)
            run_cells(regimes, seeds, _THREATS.value, store, _DATA_DIR.value, _PARALLEL.value)
        # Every regime and threat stored for these seeds: a run on a few cells does not drop the others' rows.
        path, markdown = publish_main_table(start)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {path} and {markdown}")


if __name__ == "__main__":
    runtime.run(main)
