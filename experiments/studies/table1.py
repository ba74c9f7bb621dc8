"""Table 1 analogue: central / central + lock / FedAvg / FedKL accuracy on identical backbones.

  python -m experiments.studies.table1                              # all settings (resumable, cached per run)
  python -m experiments.studies.table1 --table1_only=lenet_digits   # one setting
  python -m experiments.studies.table1 --quick                      # smoke size, into runs/table1_quick

Every number comes from the repository's own binaries, run as subprocesses: `tff_programs.train_central`
(with and without the lock) and `tff_programs.train` + `tff_programs.evaluate --accuracy_by_round`
(FedAvg on the plain backbone, FedKL on the same backbone with the lock). All four are measured on the
same evaluation examples: the test split minus the 1,000-example public cut that `evaluate` holds out
(seed 0). Central trains E epochs; federated runs E rounds of one local epoch over 3 IID clients, so
both see every training example E times. Each run's output is cached under runs/table1/ together with
the command that made it: a rerun skips finished runs, and a killed federated run resumes.
"""

import json
import os
import sys
import time

from absl import app, flags
import numpy as np

from experiments import cells, common

SETTINGS = {
    "lenet_digits": dict(model="lenet", dataset="digits", epochs=50, seeds=(0, 1, 2)),
    "resnet20_digits": dict(
        model="resnet20", dataset="digits", epochs=20, seeds=(0,), variants=("fedkl_local_statistics",)
    ),
    "lenet_fashion_mnist": dict(
        model="lenet", dataset="fashion_mnist", epochs=10, seeds=(0, 1, 2), variants=("fedkl_private_lock",)
    ),
}
QUICK = {"lenet_digits": dict(model="lenet", dataset="digits", epochs=2, seeds=(0,))}
NUM_CLIENTS = 3
PUBLIC_SIZE = 1000
COLUMNS = ("central", "central_lock", "fedavg", "fedkl")
# Extra FedKL runs a setting may ask for, with their `tff_programs.train` flags. Keeping the moving
# statistics local (FedBN-like) matters for backbones with batch normalisation after the lock: each
# client's lock shifts the activations those statistics describe, so their average fits no client.
VARIANTS = {
    "fedkl_local_statistics": ("fedkl", ["--statistics=local"]),
    # Clients draw their initial lock weights privately (the server cannot know them in round 1).
    "fedkl_private_lock": ("fedkl", ["--lock_init=private"]),
}
VARIANT_LABELS = {"fedkl_local_statistics": "FedKL, local statistics", "fedkl_private_lock": "FedKL, private lock init"}
# Evaluation-matrix entries of the FedKL run shown in the key table (see tfkl.federated.evaluation).
KEY_ENTRIES = (
    "a_own_key_and_lock",
    "b_own_lock_random_key",
    "c_own_lock_other_key",
    "c_other_key_and_lock",
    "d_global_zero_lock",
    "d_global_fresh_lock_random_key",
    "f_own_secret_own_statistics",
)

_ONLY = flags.DEFINE_list("table1_only", [], f"Run only these settings: {sorted(SETTINGS)}.")
_RUN_DIR = flags.DEFINE_string("table1_dir", "runs/table1", "Where the runs and their caches go.")


def _commands(setting, seed, run_dir):
    """{column: (argv list, output JSON)} of one setting and seed."""
    python = [sys.executable, "-m"]
    central = [
        "--model=" + setting["model"],
        "--dataset=" + setting["dataset"],
        f"--epochs={setting['epochs']}",
        f"--seed={seed}",
        f"--public_size={PUBLIC_SIZE}",
    ]
    commands = {}
    for column, lock in (("central", "false"), ("central_lock", "true")):
        out = os.path.join(run_dir, f"{column}.json")
        commands[column] = ([python + ["tff_programs.train_central", f"--lock={lock}", f"--out={out}"] + central], out)
    federated = {"fedavg": ("fedavg", []), "fedkl": ("fedkl", [])}
    federated.update({name: VARIANTS[name] for name in setting.get("variants", ())})
    for column, (algorithm, extra_flags) in federated.items():
        root = os.path.join(run_dir, column)
        out = os.path.join(run_dir, f"{column}_evaluation.json")
        train = (
            python
            + [
                "tff_programs.train",
                f"--algorithm={algorithm}",
                "--model=" + setting["model"],
                "--dataset=" + setting["dataset"],
                f"--num_clients={NUM_CLIENTS}",
                f"--rounds={setting['epochs']}",
                f"--keep_rounds={setting['epochs'] + 1}",
                f"--seed={seed}",
                "--seeded_keys",
                f"--root_dir={root}",
            ]
            + extra_flags
        )
        evaluate = python + [
            "tff_programs.evaluate",
            f"--root_dir={root}",
            "--accuracy_by_round",
            f"--public_sizes=100,{PUBLIC_SIZE}",
            f"--out={out}",
        ]
        commands[column] = ([train, evaluate], out)
    return commands


def _run_cached(argvs, out, log, cached_only=False):
    """Runs `argvs` in order unless `out` exists and was made by the same commands (`experiments.cells.run_cached`);
    returns its JSON (None when `cached_only` and it has not been made yet) and the wall time the commands took
    (None if unknown), which is kept next to it."""
    stamp = json.dumps([argv[2:] for argv in argvs])  # without the interpreter path
    if cells.is_cached(out, stamp):
        return _load(out)
    if cached_only:
        return None, None
    seconds = cells.run_cached(argvs, out, stamp, log, shown=lambda argv: " ".join(argv[2:]))
    with open(out + ".seconds", "w") as f:
        f.write(f"{seconds:.3f}")
    return _load(out)


def _load(out):
    with open(out) as f:
        doc = json.load(f)
    seconds = None
    if os.path.exists(out + ".seconds"):
        with open(out + ".seconds") as f:
            seconds = float(f.read())
    return doc, seconds


def _accuracy_and_curve(column, doc):
    if column.startswith("central"):
        return doc["test_accuracy"], {int(k): v for k, v in doc["accuracy_by_epoch"].items()}
    curve = {int(k): v for k, v in doc["accuracy_by_round"].items() if int(k) > 0}
    final = doc["global"] if "global" in doc else doc["a_own_key_and_lock"]["mean"]
    return final, curve


def _key_entries(evaluation):
    """The key-table entries of a FedKL run's evaluation matrix."""
    entries = {
        entry: (evaluation[entry]["mean"] if isinstance(evaluation[entry], dict) else evaluation[entry])
        for entry in KEY_ENTRIES
    }
    entries.update(
        {f"e_lock_recovery_{size}": entry["accuracy"] for size, entry in evaluation["e_lock_recovery"].items()}
    )
    return entries


def run_setting(name, setting, run_dir, cached_only=False, log=print):
    """The columns of one setting for each of its seeds and the key matrix of each FedKL run (the
    paper's in `key_matrix`, the variants' in `variant_key_matrix`); with `cached_only`, None unless
    every run has finished before."""
    per_seed, key_rows = {}, {}
    variant_key_rows = {variant: {} for variant in setting.get("variants", ())}
    for seed in setting["seeds"]:
        seed_dir = os.path.join(run_dir, name, f"seed_{seed}")
        per_seed[seed] = {}
        for column, (argvs, out) in _commands(setting, seed, seed_dir).items():
            doc, seconds = _run_cached(argvs, out, log, cached_only)
            if doc is None:
                return None
            accuracy, curve = _accuracy_and_curve(column, doc)
            per_seed[seed][column] = dict(
                accuracy=accuracy, curve=curve, evaluation_examples=doc["evaluation_examples"], seconds=seconds
            )
            if column == "fedkl":
                key_rows[seed] = _key_entries(doc)
            elif column in variant_key_rows:
                variant_key_rows[column][seed] = _key_entries(doc)
    return {"per_seed": per_seed, "key_matrix": key_rows, "variant_key_matrix": variant_key_rows}


def _mean_std(values):
    values = np.asarray(values, np.float64) * 100
    return f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def _setting_rows(name, result, setting):
    """(the Table 1 row, the key table's rows, the headline item) of one setting's result."""
    seeds = list(result["per_seed"])
    accuracies = {c: [result["per_seed"][s][c]["accuracy"] for s in seeds] for c in COLUMNS}
    gap = np.asarray(accuracies["fedkl"]) - np.asarray(accuracies["fedavg"])
    seconds = [run["seconds"] for s in seeds for run in result["per_seed"][s].values()]
    minutes = round(sum(seconds) / 60 / len(seeds), 1) if None not in seconds else "n/a"
    variants = [
        _mean_std([result["per_seed"][s][v]["accuracy"] for s in seeds])
        if v in setting.get("variants", ())
        else "not run"
        for v in VARIANTS
    ]
    row = (
        [name, setting["epochs"], len(seeds)]
        + [_mean_std(accuracies[c]) for c in COLUMNS]
        + [_mean_std(gap)]
        + variants
        + [minutes]
    )
    entries = list(next(iter(result["key_matrix"].values())))
    matrices = {name: result["key_matrix"]}
    matrices.update({f"{name}, {variant}": matrix for variant, matrix in result.get("variant_key_matrix", {}).items()})
    key_rows = [
        [label] + [_mean_std([matrix[s][e] for s in seeds]) for e in entries] for label, matrix in matrices.items()
    ]
    headline = {
        "metric": f"{name}: FedKL - FedAvg accuracy",
        "value": round(float(gap.mean() * 100), 2),
        "unit": "pp",
        "target": "within 1 pp",
        "met": bool(abs(gap.mean()) <= 0.01),
    }
    return row, key_rows, headline


def _payload(settings, results, quick):
    rows, key_rows, headline = [], [], []
    for name, result in results.items():
        row, setting_key_rows, item = _setting_rows(name, result, settings[name])
        rows.append(row)
        key_rows += setting_key_rows
        headline.append(item)
    key_columns = ["setting"] + list(
        next(iter(results.values()))["key_matrix"][next(iter(next(iter(results.values()))["key_matrix"]))]
    )
    return {
        "settings": {
            "settings": settings,
            "num_clients": NUM_CLIENTS,
            "split": "iid",
            "local_epochs": 1,
            "batch_size": 64,
            "optimizer": "SGD 0.01, momentum 0.9 Nesterov, weight decay 5e-4 (both)",
            "evaluation": f"test split minus the {PUBLIC_SIZE}-example public cut (seed 0; at most half "
            "of the test split)",
            "quick": quick,
        },
        "results": results,
        "tables": [
            {
                "title": "Table 1 analogue: test accuracy (%), mean ± std over seeds; E epochs central = E rounds "
                f"x 1 local epoch, {NUM_CLIENTS} IID clients",
                "columns": [
                    "setting",
                    "epochs/rounds",
                    "seeds",
                    "central",
                    "central + lock",
                    "FedAvg",
                    "FedKL (a)",
                    "FedKL - FedAvg (pp)",
                ]
                + [VARIANT_LABELS[v] for v in VARIANTS]
                + ["minutes per seed (all runs)"],
                "rows": rows,
            },
            {
                "title": "Key table: the FedKL run's evaluation matrix (%, tff_programs.evaluate)",
                "columns": key_columns,
                "rows": key_rows,
            },
        ],
        "headline": headline,
        "notes": [
            "Identical backbones: lenet/resnet20 built with and without the lock from the same seed; FedAvg is "
            "the plain backbone, FedKL the locked one; keys from --seeded_keys so reruns reproduce.",
            "FedKL (a): each client's accuracy with the global weights and its own key and lock, mean over "
            "clients. b: own lock, random key; c: another client's key (and lock); d: the global model alone; "
            "f: (a) after each client re-estimates the moving statistics on its own data; e: lock recovery by "
            "fine-tuning on N public examples (the better of: on the server's statistics, re-estimating them).",
            "FedKL, local statistics: FedKL with `tff_programs.train --statistics=local` (each client keeps the "
            "moving statistics of the batch normalisations; the paper averages them); run only where the "
            "backbone normalises after the lock (ResNet-20). FedKL, private lock init: `--lock_init=private` (each "
            "client draws its initial lock weights from the CSPRNG instead of starting from model_fn's).",
        ],
    }


def run(quick, only=(), run_dir=None):
    """Runs the settings in `only` (all if empty; the smoke setting if `quick`) and reports every
    setting whose runs have all finished, including those of earlier calls."""
    settings = QUICK if quick else SETTINGS
    run_dir = run_dir or ("runs/table1_quick" if quick else "runs/table1")
    results = {}
    for name, setting in settings.items():
        result = run_setting(name, setting, run_dir, cached_only=bool(only) and name not in only)
        if result is not None:
            results[name] = result
    return _payload({name: settings[name] for name in results}, results, quick)


def main(argv):
    del argv
    unknown = sorted(set(_ONLY.value) - set(SETTINGS))
    if unknown:
        raise app.UsageError(f"unknown --table1_only settings {unknown}; known: {sorted(SETTINGS)}")
    quick = flags.FLAGS.quick
    start = time.time()
    payload = run(quick, _ONLY.value, None if quick else _RUN_DIR.value)
    path = common.write_result(
        "table1", payload, quick, results_dir="runs/table1_quick" if quick else None, duration_s=time.time() - start
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    flags.DEFINE_bool("quick", False, "Smoke size (lenet_digits, 2 epochs, one seed) into runs/table1_quick.")
    app.run(main)
