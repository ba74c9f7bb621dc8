"""The frontier: per configuration, the worst attack measured on one capture and on pooled captures, the accuracy
and step cost, and epsilon for DP-FedAvg; with the accuracy runs the other studies lack.

  python -m experiments.studies.frontier                          # the accuracy runs (resumable), then the table
  python -m experiments.studies.frontier --frontier_seeds=0,1,2 --frontier_configs=compact-noise
  python -m experiments.studies.frontier --frontier_tabulate_only  # results/frontier.json and .md only

Attacks come from the published studies: results/candidates.json (batch 1 and U8, the configuration's own threat;
references under no threat) and results/rounds.json (regime M1: K = 1 is one capture of a real run, K > 1 the
pooled attack). Accuracy: LeNet Fashion-MNIST, 3 clients, 20 rounds (experiments.studies.key_table's protocol),
entry (a) of tff_programs.evaluate, minus the FedAvg control's mean over the same protocol; from
results/candidates.json where it measured the configuration, else from this study's own runs (records in
results/frontier_cells/<configuration>/seed<s>.json). Step cost: results/candidates.json (median LeNet step over the
control's) or results/lock_cost.json (CPU clock) for the compact forms. Epsilon: dp_accounting's RDP at delta 1e-5
after the 20 rounds of the accuracy runs, every client in every round.
"""

import dataclasses
import glob
import json
import os
import statistics
import time

from absl import flags

from experiments import cells, common, runtime
from experiments.studies import key_table, rounds


@dataclasses.dataclass(frozen=True)
class Config:
    """A configuration and where each of its figures comes from (None: not measured)."""

    label: str
    candidate: str = None  # its configuration in results/candidates.json (attacks, accuracy, step)
    rounds_row: str = None  # its row in results/rounds.json
    train_flags: tuple = None  # for this study's accuracy runs, where candidates.json has no accuracy
    step: str = None  # its variant in results/lock_cost.json, where candidates.json has no step
    dp_noise: float = None


PRUNE_FLAG = f"--prune_fraction={rounds.PRUNE}"
DP_FLAGS = (f"--dp_clip={rounds.DP_CLIP}", "--client_weighting=uniform", "--algorithm=fedavg-norm")
CONFIGS = {
    "none": Config("no defence (the FedAvg control)", "none", "none"),
    "paper": Config("the paper's lock", "paper", "paper"),
    "spatial": Config("the spatial lock", "spatial", "spatial"),
    "compact": Config("the spatial lock, compact kernels", "spatial", "compact", step="compact"),
    **{
        row: Config(
            f"the compact spatial lock, lock noise {noise:g}",
            None,
            row,
            (*rounds.COMPACT_SPATIAL, f"--lock_noise={noise}"),
            "compact-noise",
        )
        for row, noise in rounds.LOCK_NOISES.items()
    },
    "compact-pruned": Config(
        f"the compact spatial lock, {rounds.PRUNE * 100:.0f} % update pruning",
        None,
        "compact-pruned",
        (*rounds.COMPACT_SPATIAL, PRUNE_FLAG),
        "compact",
    ),
    **{
        row: Config(
            f"DP-FedAvg, noise {noise:g} x clip {rounds.DP_CLIP:g}",
            None,
            row,
            (*DP_FLAGS, f"--dp_noise_multiplier={noise}"),
            dp_noise=noise,
        )
        for row, noise in rounds.DP_NOISE.items()
    },
}
ACCURACY_ROUNDS = key_table.SETTING["rounds"]

_CONFIGS = flags.DEFINE_list(
    "frontier_configs", [n for n, c in CONFIGS.items() if c.train_flags], "Configurations whose accuracy runs run."
)
_SEEDS = flags.DEFINE_list("frontier_seeds", ["0"], "Seeds of the accuracy runs.")
_RUN_DIR = flags.DEFINE_string("frontier_dir", "runs/frontier", "Where the accuracy runs go.")
_RECORDS_DIR = flags.DEFINE_string("frontier_records_dir", "results/frontier_cells", "Where their records go.")
_TABULATE_ONLY = flags.DEFINE_bool("frontier_tabulate_only", False, "Run nothing: tabulate what is stored.")
flags.register_validator(
    "frontier_configs",
    lambda v: all(CONFIGS.get(n) and CONFIGS[n].train_flags for n in v),
    f"--frontier_configs must be among {[n for n, c in CONFIGS.items() if c.train_flags]}",
)
flags.register_validator("frontier_seeds", lambda v: all(s.isdigit() for s in v), "--frontier_seeds: integers >= 0")


def record_path(records_dir, name, seed):
    return os.path.join(records_dir, name, f"seed{seed}.json")


def run_accuracy(name, seed, run_dir, records_dir, log=print):
    """Trains and evaluates `name` at `seed` unless its record is stored; the record: own-key and random-key
    accuracy (entries a and b), the commands and their seconds."""
    path = record_path(records_dir, name, seed)
    if os.path.exists(path):
        return
    train, evaluate, out = key_table.commands(name, seed, key_table.SETTING, run_dir, list(CONFIGS[name].train_flags))
    doc = key_table.run_cached([train, evaluate], out, log)
    own = doc.get("global", doc.get("a_own_key_and_lock"))
    random_key = doc.get("b_own_lock_random_key")
    record = dict(
        config=name,
        seed=seed,
        own=own["mean"] if isinstance(own, dict) else own,
        random_key=random_key["mean"] if isinstance(random_key, dict) else random_key,
        commands=[" ".join(train), " ".join(evaluate)],
        seconds=doc.get("seconds"),
    )
    common.write_json(path, record)


# -- the table ------------------------------------------------------------------------------------------------
SINGLE_CELLS = {"grnn": "GRNN, batch 1", "ig": "IG, batch 1", "grnn-u8": "GRNN, U8", "ig-u8": "IG, U8"}
CHANCE = 0.1


def published(name):
    with open(common.result_path(name)) as f:
        return json.load(f)["results"]


def single_capture(config, candidates, pooled_rows):
    """[(where, success)] of every one-capture attack measured on `config`."""
    found = []
    by_configuration = candidates["by_configuration"]
    if config.candidate:
        success = by_configuration[config.candidate]["success"]
        found += [(where, success[cell]["ssim"]) for cell, where in SINGLE_CELLS.items() if cell in success]
    found += [
        (f"{attack}, {regime} one capture", success)
        for regime, attack, count, success in _rounds_cells(config, pooled_rows)
        if count == 1
    ]
    return found


def _rounds_cells(config, pooled_rows):
    """(regime, attack, K, success) of every cell of results/rounds.json measured on `config`."""
    return [
        (regime, attack.upper(), int(count), success)
        for regime, rows in pooled_rows.items()
        for attack, by_count in rows.get(config.rounds_row, {}).items()
        for count, success in by_count.items()
    ]


def pooled_captures(config, pooled_rows):
    """[(where, success)] of every pooled attack (K > 1) measured on `config`."""
    return [
        (f"{attack}, {regime} K = {count}", success)
        for regime, attack, count, success in _rounds_cells(config, pooled_rows)
        if count > 1
    ]


def worst(cells_):
    """The (where, success) that leaks most surely: the highest Wilson lower bound, then rate, then images; or None."""
    return max(cells_, key=lambda c: (round(c[1]["low"], 6), c[1]["rate"], c[1]["n"]), default=None)


def accuracy(name, config, candidates, records_dir):
    """(own-key accuracy minus the control's, its seeds, random-key accuracy) in fractions; None: not measured."""
    control = candidates["control"]
    if name == "none":
        return 0.0, 3, None
    if config.candidate:
        entry = candidates["by_configuration"][config.candidate]
        return entry["lenet_minus_control"], entry["lenet_seeds"], entry["random_key"]
    records = []
    for path in sorted(glob.glob(record_path(records_dir, name, "*"))):
        with open(path) as f:
            records.append(json.load(f))
    if not records:
        return None, 0, None
    keys = [r["random_key"] for r in records if r["random_key"] is not None]
    return (
        statistics.fmean(r["own"] for r in records) - control,
        len(records),
        (statistics.fmean(keys) if keys else None),
    )


def step_ratio(config, candidates, lock_cost):
    """The LeNet train step over the control's: the compact forms' from lock_cost, the others' from candidates;
    the control and DP-FedAvg (whose clients train the control) take its step."""
    if config.step:
        return lock_cost["lenet"]["clocks"]["cpu"]["ratio_to_control"].get(config.step, {}).get("median")
    if config.dp_noise is not None or config.candidate == "none":
        return 1.0
    return candidates["by_configuration"][config.candidate].get("step_time_ratio")


def meets_target(single, pooled, minus_control, random_key):
    """The ship target: every attack <= 5 % with a Wilson upper bound <= 15 %, accuracy within 1 pp of the
    control, a random key <= chance + 10 pp."""
    attacks_hold = all(s["rate"] <= 0.05 and s["high"] <= 0.15 for _, s in single + pooled)
    return bool(
        single
        and pooled
        and attacks_hold
        and minus_control is not None
        and minus_control >= -0.01
        and (random_key is None or random_key <= CHANCE + 0.10)
    )


def row_of(name, config, sources, records_dir):
    """The frontier's figures of configuration `name`."""
    candidates, pooled_rows, lock_cost = sources
    single, pooled = single_capture(config, candidates, pooled_rows), pooled_captures(config, pooled_rows)
    minus_control, seeds, random_key = accuracy(name, config, candidates, records_dir)
    epsilon = None if config.dp_noise is None else rounds.epsilon(config.dp_noise, ACCURACY_ROUNDS)
    return dict(
        label=config.label,
        worst_single=worst(single),
        worst_pooled=worst(pooled),
        accuracy_minus_control=minus_control,
        accuracy_seeds=seeds,
        random_key=random_key,
        step_ratio=step_ratio(config, candidates, lock_cost),
        epsilon=epsilon,
        meets_target=meets_target(single, pooled, minus_control, random_key),
    )


def _attack_cell(found):
    return "not measured" if found is None else f"{found[0]}: {_format_success(found[1])}"


def _format_success(success):
    from attacks import experiment

    return experiment.format_success(success)


def _percent(value, signed=False):
    return "not measured" if value is None else f"{100 * value:{'+' if signed else ''}.1f}"


def table_of(rows):
    columns = [
        "configuration",
        "worst attack, one capture",
        "worst attack, pooled captures",
        "accuracy - control (pp, seeds)",
        "random key + own lock (%)",
        "train step / control",
        f"epsilon (delta {rounds.DP_DELTA:g}, {ACCURACY_ROUNDS} rounds)",
        "meets the target",
    ]
    body = [
        [
            row["label"],
            _attack_cell(row["worst_single"]),
            _attack_cell(row["worst_pooled"]),
            f"{_percent(row['accuracy_minus_control'], signed=True)} ({row['accuracy_seeds']})",
            "no key" if row["random_key"] is None else _percent(row["random_key"]),
            "not measured" if row["step_ratio"] is None else f"{row['step_ratio']:.2f}x",
            "–" if row["epsilon"] is None else f"{row['epsilon']:.1f}",
            "yes" if row["meets_target"] else "no",
        ]
        for row in rows.values()
    ]
    title = "the frontier: per configuration, the worst attack measured, the accuracy and the step cost"
    return {"title": title, "columns": columns, "rows": body}


NOTES = [
    "Recovered: aligned SSIM >= 0.6, recovered/n with the Wilson 95 % interval; the worst attack is picked by the "
    "measured success (the highest Wilson lower bound): an upper bound on any one attack's; each attack under the "
    "configuration's strongest threat without the key ('adaptive' for locks: the lock's unknowns optimised with the "
    "images; none for the others). One capture: results/candidates.json (batch 1: 10 images x 3 seeds; U8: an "
    "update of 8 images in 4 steps, step labels given) and regime M's first capture (results/rounds.json: M1 a new "
    "image each round, M8 the same 8 images each round in 4 steps); pooled: one client's first K captures of M1 or "
    "M8 attacked together, K > 1.",
    "Lock noise 0.1 has its accuracy runs only (not attacked): at 0.25 the pooled attack already rebuilds half of "
    "the images at K = 16.",
    "The compact spatial lock computes what the spatial lock computes (tested to 1e-5): its batch-1 and U8 cells "
    "and its accuracy are the spatial lock's; its step, and the lock noise's, are results/lock_cost.json's (LeNet, "
    "CPU clock). Pruning adds a top-k over the update once per round (not timed).",
    "DP-FedAvg (TFF's gaussian_fixed aggregator) adds its noise to the sum: the server attacks each clipped update "
    "before it. Epsilon is that of the accuracy runs (every client in every round); with their 3 clients the noise "
    "on the mean is noise x clip / 3 per entry, which no model trains through: DP-FedAvg needs hundreds of clients "
    "per round.",
    "Target: every attack <= 5 % recovered with a Wilson upper bound <= 15 %, accuracy within 1 pp of the control, a "
    "random key <= chance + 10 pp. 'not measured' counts as not met.",
]


def tabulate(records_dir):
    sources = (published("candidates"), published("rounds"), published("lock_cost"))
    rows = {name: row_of(name, config, sources, records_dir) for name, config in CONFIGS.items()}
    control = sources[0]["control"]
    headline = [{"metric": "configurations meeting the target", "value": sum(r["meets_target"] for r in rows.values())}]
    settings = dict(accuracy=dict(key_table.SETTING, clients=key_table.NUM_CLIENTS), control_accuracy=control)
    return {"results": rows, "tables": [table_of(rows)], "notes": NOTES, "headline": headline, "settings": settings}


def main(argv):
    del argv
    start = time.perf_counter()
    if not _TABULATE_ONLY.value:
        for seed in _SEEDS.value:
            for name in _CONFIGS.value:
                run_accuracy(name, int(seed), _RUN_DIR.value, _RECORDS_DIR.value)
    payload = tabulate(_RECORDS_DIR.value)
    for path in cells.publish("frontier", payload, time.perf_counter() - start, _RECORDS_DIR.value):
        print(path)


if __name__ == "__main__":
    runtime.run(main)
