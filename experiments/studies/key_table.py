"""The key table ("a key that matters"): does the shared model need the client's key?

  python -m experiments.studies.key_table                            # seed 0 of every configuration (resumable)
  python -m experiments.studies.key_table --key_table_seeds=0,1,2    # three seeds
  python -m experiments.studies.key_table --quick  # smoke size (digits, 2 rounds) into runs/key_table_quick

LeNet on Fashion-MNIST, 3 IID clients, 20 rounds of one local epoch, the paper's optimizer (SGD 0.01,
Nesterov momentum 0.9, weight decay 5e-4), keys from --seeded_keys. Configurations: FedKL with the
paper's uniform keys, zero-mean gaussian keys and rademacher keys; FedKL uniform with the random-key
penalty; the FedAvg control (`--algorithm=fedavg-norm`: the lock blocks replaced by the same
normalisation with a learned affine) and plain FedAvg (the backbone without any normalisation).
Each training run is its own `tff_programs.train` process, then `tff_programs.evaluate` (entries
a-f, lock recovery and the from-scratch yardstick at 100 and 1,000 public examples). A run's output
is cached under runs/key_table/ with the commands that made it: a rerun skips finished runs and a
killed training run resumes from its last complete round. The JSON (results/key_table.json) and
its table (results/key_table.md) are rewritten after every finished run, labelled partial until
every requested run is done.
"""

import functools
import json
import os
import subprocess
import sys
import time

from absl import flags
import numpy as np

from experiments import cells, common, runtime

# name: (label, tff_programs.train flags beyond the common ones)
CONFIGS = {
    "fedkl_uniform": ("FedKL, uniform keys (the paper's)", ["--algorithm=fedkl", "--key_distribution=uniform"]),
    "fedkl_gaussian": ("FedKL, gaussian keys", ["--algorithm=fedkl", "--key_distribution=gaussian"]),
    "fedavg_norm": ("FedAvg control (learned affine, no key)", ["--algorithm=fedavg-norm"]),
    "fedkl_rademacher": ("FedKL, rademacher keys", ["--algorithm=fedkl", "--key_distribution=rademacher"]),
    "fedkl_uniform_penalty": (
        "FedKL, uniform keys + random-key penalty 1.0",
        ["--algorithm=fedkl", "--key_distribution=uniform", "--random_key_penalty=1.0"],
    ),
    "fedavg": ("FedAvg, no normalisation", ["--algorithm=fedavg"]),
}
SETTING = dict(model="lenet", dataset="fashion_mnist", rounds=20, public_sizes=(100, 1000), recovery_steps=300)
QUICK = dict(model="lenet", dataset="digits", rounds=2, public_sizes=(20, 100), recovery_steps=20, key_dim=16)
NUM_CLIENTS = 3
# Bumped when tff_programs.evaluate's entries change: cached evaluations of another version run again
# (their training runs are complete: `train` has nothing to do). 2: lock recovery also fits gamma/beta directly.
EVALUATION_VERSION = 2
TARGET_RANDOM_KEY_PP = 10  # random key + own lock <= chance + 10 pp
TARGET_RECOVERY_PP = 5  # lock recovery minus from scratch <= 5 pp at the smallest public size
ENTRIES = (
    ("own key and lock (a)", "a_own_key_and_lock"),
    ("random key + own lock (b)", "b_own_lock_random_key"),
    ("other client's key and lock (c)", "c_other_key_and_lock"),
    ("zero lock (d)", "d_global_zero_lock"),
)

_SEEDS = flags.DEFINE_list("key_table_seeds", ["0"], "Seeds of every configuration.")
_CONFIGS = flags.DEFINE_list("key_table_configs", list(CONFIGS), f"Configurations to run: {list(CONFIGS)}.")
_RUN_DIR = flags.DEFINE_string("key_table_dir", None, "Runs and caches (default runs/key_table[_quick]).")
_OUT = flags.DEFINE_string(
    "key_table_out", None, "JSON output (default results/key_table.json; quick: in the run dir)."
)
flags.register_validator(
    "key_table_seeds",
    lambda v: bool(v) and all(s.isdigit() for s in v),
    "--key_table_seeds takes comma-separated non-negative integers",
)
flags.register_validator(
    "key_table_configs",
    lambda v: bool(v) and set(v) <= set(CONFIGS),
    f"--key_table_configs takes a comma-separated list of {list(CONFIGS)}",
)


def commands(name, seed, setting, run_dir, config_flags=None):
    """(train argv, evaluate argv, evaluation JSON) of configuration `name` (its flags, or `config_flags`)
    and `seed`."""
    root = os.path.join(run_dir, f"seed_{seed}", name)
    out = root + "_evaluation.json"
    train = [
        "tff_programs.train",
        f"--model={setting['model']}",
        f"--dataset={setting['dataset']}",
        f"--num_clients={NUM_CLIENTS}",
        f"--rounds={setting['rounds']}",
        f"--seed={seed}",
        "--seeded_keys",
        f"--root_dir={root}",
    ]
    train += [f"--key_dim={setting['key_dim']}"] if "key_dim" in setting else []
    train += CONFIGS[name][1] if config_flags is None else config_flags
    evaluate = [
        "tff_programs.evaluate",
        f"--root_dir={root}",
        "--public_sizes=" + ",".join(str(s) for s in setting["public_sizes"]),
        f"--recovery_steps={setting['recovery_steps']}",
        f"--out={out}",
    ]
    return train, evaluate, out


def run_cached(argvs, out, log=print):
    """Runs `argvs` (module argument lists) in order, each in its own process (`experiments.cells.run_cached`),
    unless `out` exists and was made by the same commands; returns `out`'s JSON. A training command rerun after
    a kill resumes its run. Output goes to out + '.log' (a file: TFF's worker can outlive a pipe's reader)."""
    seconds = cells.run_cached([[sys.executable, "-m", *argv] for argv in argvs], out, _stamp(argvs), log, _shown)
    if seconds is None:
        return cached_doc(argvs, out)
    with open(out, "r+") as f:  # the evaluation JSON gets the wall time of its commands (this call's)
        doc = json.load(f)
        doc.setdefault("seconds", round(seconds, 1))
        f.seek(0)
        json.dump(doc, f, indent=1)
        f.truncate()
    return doc


def _shown(argv):
    return " ".join(argv[2:])  # without the interpreter


def _stamp(argvs):
    return json.dumps({"commands": argvs, "evaluation": EVALUATION_VERSION})


def cached_doc(argvs, out):
    """`out`'s JSON if the same commands made it (see `run_cached`), else None."""
    if not cells.is_cached(out, _stamp(argvs)):
        return None
    with open(out) as f:
        return json.load(f)


def round_seconds(root_dir):
    """Median seconds per training round (rounds after the first, which traces), from metrics.csv."""
    path = os.path.join(root_dir, "metrics.csv")
    if not os.path.exists(path):
        return None
    import csv

    with open(path) as f:
        rows = [row for row in csv.DictReader(f) if row.get("seconds") and int(row["round"]) > 1]
    return float(np.median([float(row["seconds"]) for row in rows])) if rows else None


def row_of(doc, sizes):
    """The key-table figures (fractions) of one run's evaluation JSON."""
    if "global" in doc:  # FedAvg: no secret; every entry is the global model
        return {"own": doc["global"]}
    row = {key: (doc[key]["mean"] if isinstance(doc[key], dict) else doc[key]) for _, key in ENTRIES}
    row["own"] = row["a_own_key_and_lock"]
    for size in sizes:
        recovery = doc["e_lock_recovery"][str(size)]["accuracy"]
        scratch = doc.get("e_from_scratch", {}).get(str(size), {}).get("accuracy")
        row[f"recovery_{size}"] = recovery
        row[f"scratch_{size}"] = scratch
        row[f"gain_{size}"] = None if scratch is None else recovery - scratch
    return row


def _cell(values, scale=100.0, signed=False):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    array = np.asarray(values, np.float64) * scale
    text = f"{array.mean():+.1f}" if signed else f"{array.mean():.1f}"
    return text + (f" ± {array.std():.1f}" if len(array) > 1 else "")


def table_columns(sizes):
    """The key table's columns (`table_row`'s cells) for public-example counts `sizes`."""
    columns = ["configuration", "seeds"] + [label for label, _ in ENTRIES]
    for size in sizes:
        columns += [f"lock recovery, {size}", f"from scratch, {size}", f"recovery - scratch, {size} (pp)"]
    return columns + [
        f"random key <= chance + {TARGET_RANDOM_KEY_PP} pp",
        f"recovery - scratch <= {TARGET_RECOVERY_PP} pp",
    ]


def table_row(label, values, sizes, chance=0.1):
    """(key-table row, figures) of one configuration's runs (`row_of`, one per seed): figures holds the mean
    random-key accuracy, the gain (recovery - from scratch) at sizes[0] and whether each meets its target;
    None for a run without a key (FedAvg), whose row fills its own accuracy only."""
    if "a_own_key_and_lock" not in values[0]:
        row = [label, len(values), _cell([v["own"] for v in values])]
        return row + ["no key"] * (len(table_columns(sizes)) - 3), None
    cells = [_cell([v[key] for v in values]) for _, key in ENTRIES]
    for size in sizes:
        cells += [
            _cell([v[f"recovery_{size}"] for v in values]),
            _cell([v[f"scratch_{size}"] for v in values]),
            _cell([v[f"gain_{size}"] for v in values], signed=True),
        ]
    random_key = float(np.mean([v["b_own_lock_random_key"] for v in values]))
    gains = [v[f"gain_{sizes[0]}"] for v in values if v[f"gain_{sizes[0]}"] is not None]
    gain = float(np.mean(gains)) if gains else None
    key_met = random_key <= chance + TARGET_RANDOM_KEY_PP / 100
    gain_met = None if gain is None else gain <= TARGET_RECOVERY_PP / 100
    cells += [
        "reached" if key_met else "not reached",
        "n/a" if gain_met is None else ("reached" if gain_met else "not reached"),
    ]
    return [label, len(values)] + cells, dict(random_key=random_key, gain=gain, key_met=key_met, gain_met=gain_met)


def _headline(name, figures, sizes, chance):
    """A configuration's headline items: random key + own lock, and lock recovery against from scratch."""
    items = [
        dict(
            metric=f"{name}: random key + own lock",
            value=round(100 * figures["random_key"], 1),
            unit="%",
            target=f"<= chance + {TARGET_RANDOM_KEY_PP} pp ({100 * chance + TARGET_RANDOM_KEY_PP:.0f} %)",
            met=figures["key_met"],
        )
    ]
    if figures["gain"] is not None:
        items.append(
            dict(
                metric=f"{name}: lock recovery - from scratch, {sizes[0]} public examples",
                value=round(100 * figures["gain"], 1),
                unit="pp",
                target=f"<= {TARGET_RECOVERY_PP} pp",
                met=figures["gain_met"],
            )
        )
    return items


def _notes(setting, seeds, missing, sizes, chance):
    notes = [
        "Entries: (a) global shared weights + each client's own key and lock, mean over the 3 clients; (b) each "
        "client's own lock under a fresh random key of the run's own key distribution; (c) the next client's "
        "key and lock in this client's model; (d) the global model as the server holds it, lock weights zero; lock "
        "recovery: the global model with a fresh lock and a random key, the lock layers fine-tuned on N public "
        "labelled test examples (from that fresh lock, and from zero kernels with gamma/beta fitted directly "
        "as the lock biases; Adam 0.01, "
        f"{setting['recovery_steps']} steps each; the best of the four with server or re-estimated statistics); from "
        "scratch: the same locked model from model_fn's initial weights with a random key, every weight trained on "
        "the same N examples alone (Adam 1e-3, batch 32, max(300 steps, 30 epochs), fixed before any run). "
        "FedAvg rows have no key: their 'own key' column is the global model's accuracy.",
        f"Chance is {100 * chance:.0f} % (10 classes). Targets: random key <= chance + "
        f"{TARGET_RANDOM_KEY_PP} pp; recovery - from scratch <= {TARGET_RECOVERY_PP} pp at {sizes[0]} examples, "
        "both on the mean over seeds.",
        f"The accuracies are on the test split minus the {max(sizes)}-example public cut (evaluate's seed 0).",
    ]
    if missing:
        notes.append(
            "PARTIAL: not finished yet: "
            + ", ".join(missing)
            + ". The same command resumes them: python -m experiments.studies.key_table --key_table_seeds="
            + ",".join(str(s) for s in seeds)
        )
    return notes


def _comparisons(by_config, seconds):
    """The random-key penalty's cost and each FedKL key distribution against the control."""
    cost = {}
    if "fedkl_uniform" in by_config and "fedkl_uniform_penalty" in by_config:
        cost["accuracy_pp"] = 100 * (by_config["fedkl_uniform_penalty"]["own"] - by_config["fedkl_uniform"]["own"])
        plain, penalized = seconds.get("fedkl_uniform"), seconds.get("fedkl_uniform_penalty")
        if plain and penalized:
            cost["round_time_ratio"] = penalized / plain
    if "fedavg_norm" in by_config:
        for name in ("fedkl_uniform", "fedkl_gaussian", "fedkl_rademacher"):
            if name in by_config:
                cost[f"{name}_minus_control_pp"] = 100 * (by_config[name]["own"] - by_config["fedavg_norm"]["own"])
    return cost


def payload(setting, seeds, names, rows, seconds, missing, quick):
    """The benchmark payload from the finished runs' rows: {name: {seed: row}}."""
    sizes = setting["public_sizes"]
    chance = 0.1
    columns = table_columns(sizes)
    table_rows, headline, by_config = [], [], {}
    for name in names:
        done = rows.get(name, {})
        if not done:
            continue
        values = list(done.values())
        row, figures = table_row(CONFIGS[name][0], values, sizes, chance)
        table_rows.append(row)
        by_config[name] = dict(own=float(np.mean([v["own"] for v in values])))
        if figures is not None:
            by_config[name].update(random_key=figures["random_key"], gain=figures["gain"])
            headline += _headline(name, figures, sizes, chance)
    notes = _notes(setting, seeds, missing, sizes, chance)
    cost = _comparisons(by_config, seconds)
    return {
        "settings": dict(
            setting,
            public_sizes=list(sizes),
            num_clients=NUM_CLIENTS,
            seeds=[int(s) for s in seeds],
            configurations={name: CONFIGS[name][1] for name in names},
            optimizer="SGD 0.01, momentum 0.9 Nesterov, weight decay 5e-4 (tff_programs.train's defaults)",
            quick=quick,
        ),
        "results": dict(
            partial=bool(missing),
            missing=missing,
            per_run={name: {str(s): r for s, r in done.items()} for name, done in rows.items()},
            median_round_seconds=seconds,
            comparisons=cost,
        ),
        "tables": [
            {
                "title": f"Key table: accuracy (%) of each entry, {setting['model']} {setting['dataset']}, "
                f"{NUM_CLIENTS} clients, {setting['rounds']} rounds, mean ± std over seeds"
                + (" (PARTIAL)" if missing else ""),
                "columns": columns,
                "rows": table_rows,
            }
        ],
        "headline": headline,
        "notes": notes,
    }


def markdown(doc):
    """results/key_table.md: the table, the targets and the notes."""
    lines = [f"# Key table{' (partial)' if doc['results']['partial'] else ''}", ""]
    lines += [f"`{doc['command']}` at commit {doc['git_commit']}, {doc['date']}", ""]
    for table in doc["tables"]:
        lines += [f"**{table['title']}**", ""]
        lines += ["| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table["rows"]]
        lines.append("")
    comparisons = doc["results"]["comparisons"]
    if comparisons:
        lines += ["Comparisons: " + ", ".join(f"{k} {v:+.2f}" for k, v in comparisons.items()), ""]
    lines += [f"- {note}" for note in doc["notes"]]
    return "\n".join(lines) + "\n"


def run_table(quick=False, seeds=(0,), names=tuple(CONFIGS), run_dir=None, out=None, log=print):
    """Runs (or resumes) every requested configuration and seed, seed by seed, rewriting the JSON and
    the markdown after each finished run; returns the JSON's path."""
    setting = QUICK if quick else SETTING
    run_dir = run_dir or ("runs/key_table_quick" if quick else "runs/key_table")
    out = out or (os.path.join(run_dir, "key_table.json") if quick else common.result_path("key_table"))
    start = time.time()
    rows, seconds = {}, {}
    pending = [(name, seed) for seed in seeds for name in names]

    def write():
        missing = [f"{name} seed {seed}" for name, seed in pending]
        doc = common.envelope(
            "key_table",
            payload(setting, seeds, names, rows, seconds, missing, quick),
            quick,
            duration_s=time.time() - start,
        )
        common.write_json(out, doc)
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(markdown(doc))

    for name, seed in list(pending):
        train, evaluate, evaluation_out = commands(name, seed, setting, run_dir)
        doc = run_cached([train, evaluate], evaluation_out, log)
        rows.setdefault(name, {})[int(seed)] = row_of(doc, setting["public_sizes"])
        if int(seed) == int(seeds[0]):
            seconds[name] = round_seconds(os.path.join(run_dir, f"seed_{seed}", name))
        pending.remove((name, seed))
        write()
    return out


def main(argv):
    del argv  # runtime.run's flag parsing refused positional arguments
    names = [name for name in CONFIGS if name in _CONFIGS.value]
    seeds = [int(s) for s in _SEEDS.value]
    log = functools.partial(print, flush=True)
    try:
        path = run_table(flags.FLAGS.quick, seeds, names, _RUN_DIR.value, _OUT.value, log=log)
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: {' '.join(e.cmd[2:4])} failed (exit {e.returncode}); see the log next to its root dir")
    print(f"wrote {path} and {os.path.splitext(path)[0]}.md")


if __name__ == "__main__":
    flags.DEFINE_bool("quick", False, "Smoke size (digits, 2 rounds, key_dim 16) into runs/key_table_quick.")
    runtime.run(main)
