"""Key-lock candidates for claim (a), side by side against the strongest adaptive attacker.

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

This module is the study's specification (the candidates, their runs' commands, the attack cells and their
records); `run` runs the parts, `table` tabulates them and draws the frontier, `__main__` is the program.
"""

import dataclasses
import os

from experiments import cells
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


def candidate_of(name):
    return CANDIDATES.get(name) or REFERENCES.get(name) or {"control": CONTROL}[name]


# -- lenet and resnet: the training runs' commands-----------------------------------------------------------
def lenet_commands(name, seed, run_dir):
    """key_table.commands of candidate `name` (the key table's own run dir when it shares its runs)."""
    candidate = candidate_of(name)
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
    candidate = candidate_of(name)
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


# -- attacks: batch-1 cells, one process each, one cache file per image --------------------------------
def attack_names(names):
    """The attacked configurations: the candidates, then the references."""
    return [*names, *REFERENCES]


def layout(cell):
    folder = f"{cell.attack}_{cell.threat.replace(':', '_')}" if cell.threat else cell.attack
    return os.path.join("attacks", cell.regime, folder, f"seed{cell.seed}")


def records(run_dir):
    """The attack cells' records (`experiments.cells.RecordStore`): one file per image."""
    return cells.RecordStore(run_dir, layout, "{:03d}.json", indent=2, trailing_newline=True)


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
