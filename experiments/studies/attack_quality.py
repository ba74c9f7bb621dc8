"""Attack quality: DLG, iDLG, IG and GRNN under the four threat models, on the same images.

  python -m experiments.studies.attack_quality                 # default set (~15-20 min on 2 CPU cores)
  python -m experiments.studies.attack_quality --attack_set=full    # + IG/GRNN on all images, ResNet-20, batch 4
  python -m experiments.studies.attack_quality --attack_only=idlg_fashion_mnist --attack_num_images=3
  python -m experiments.studies.attack_quality --attack_set=table6 --attack_seeds=0,1,2   # the Table 6 analogue

Victims: untrained LeNet (PyTorch init, seed 0) without the lock ('none') and the identical
backbone with the lock (other threats), batch 1 single-step gradients unless stated. Each
experiment writes results/attacks_<name>.json (per image metrics, mean/std/median
summaries, time, iterations/s) and its PNG grid under runs/attack_quality/<name>/; the whole run
also writes results/attack_quality.json (tables + headline) in the benchmarks' format.
"""

import inspect
import json
import os
import time

from absl import app, flags
import numpy as np
import tensorflow  # noqa: F401  (before absl's main: Keras' Flatten breaks if TF is first imported inside it)

from experiments import common

ALL_THREATS = ["none", "oracle", "fixed-key", "adaptive"]
LENET = dict(model="lenet", init="pytorch")


# Each attack's options in the stored results (iterations, restarts and its own settings).
ATTACK_OPTIONS = {
    "dlg": dict(iterations=1000, restarts=1),
    "idlg": dict(iterations=1500, restarts=2),
    "ig": dict(iterations=1500, restarts=2, tv=1e-4, learning_rate=0.1),
    "grnn": dict(iterations=1500, learning_rate=1e-3),
}
UPDATE = dict(batch_size=2, target="update", update_options=dict(batch_size=1, local_epochs=1, learning_rate=0.01))


def _spec(attack, dataset, num_images, model=LENET, threats=ALL_THREATS, options=None, **extra):
    """study.run's keyword arguments of one experiment."""
    options = dict(ATTACK_OPTIONS[attack]) if options is None else options
    return dict(model, attack=attack, threats=threats, dataset=dataset, num_images=num_images, **extra, options=options)


def _experiments(num_images):
    """{set name: [(experiment name, run() keyword arguments)]}."""
    default = [
        (f"{attack}_{dataset}", _spec(attack, dataset, num_images))
        for dataset in ("fashion_mnist", "digits")
        for attack in ("dlg", "idlg")
    ]
    default += [(f"{attack}_fashion_mnist_4", _spec(attack, "fashion_mnist", 4)) for attack in ("ig", "grnn")]
    update = _spec("idlg", "fashion_mnist", 4, options=dict(iterations=600, restarts=2), **UPDATE)
    default.append(("idlg_update_fashion_mnist", update))
    full = default + [
        (f"{attack}_{dataset}", _spec(attack, dataset, num_images))
        for dataset in ("fashion_mnist", "digits")
        for attack in ("ig", "grnn")
    ]
    resnet = dict(model="resnet20", init="pytorch")
    trained = dict(train_epochs=2, train_examples=5000)
    ig_short = dict(ATTACK_OPTIONS["ig"], iterations=1000, restarts=1)
    full.append(("ig_resnet20_trained", _spec("ig", "fashion_mnist", 3, resnet, options=ig_short, **trained)))
    batch4 = _spec("idlg", "fashion_mnist", 8, threats=["none", "oracle"], batch_size=4)
    full.append(("idlg_batch4_fashion_mnist", batch4))
    # Table 6: every attack under every threat on Fashion-MNIST single gradients and captured updates.
    table6 = [
        (f"{attack}_fashion_mnist", dict(full)[f"{attack}_fashion_mnist"]) for attack in ("dlg", "idlg", "ig", "grnn")
    ]
    # The adaptive attacker that knows the lock weights (round 1: the server's initial lock) and optimises the key.
    single = [(n, k) for n, k in table6 if n != "dlg_fashion_mnist"]
    table6 += [(f"{n}_adaptive_key", dict(k, threats=["adaptive-key"])) for n, k in single]
    # The same attacker against clients that draw their lock weights privately (lock_init='private'):
    # it knows only model_fn's lock weights.
    table6 += [(f"{n}_private_lock", dict(k, threats=["adaptive-key"], lock_init="private")) for n, k in single]
    table6.append(("idlg_update10_fashion_mnist", dict(update, num_images=num_images)))
    return {"default": default, "full": full, "table6": table6}


_SET = flags.DEFINE_enum("attack_set", "default", ("default", "full", "table6"), "Which experiments to run.")
_SEEDS = flags.DEFINE_list("attack_seeds", ["0"], "Seeds to run each experiment with (victim, key, attack starts).")
_RERUN = flags.DEFINE_bool("attack_rerun", False, "Rerun experiments whose result files already hold them.")
_STORED_ONLY = flags.DEFINE_bool(
    "attack_stored_only",
    False,
    "Run nothing: tabulate the stored results of the chosen "
    "experiments and seeds (e.g. table6.json while parts still run elsewhere).",
)
_ONLY = flags.DEFINE_list("attack_only", [], "Run only these experiments (names as in the JSON files).")
_NUM_IMAGES = flags.DEFINE_integer(
    "attack_num_images", 10, "Images per data set for the main experiments.", lower_bound=1
)
_OUT_DIR = flags.DEFINE_string("attack_out_dir", "runs/attack_quality", "Where the PNG grids go.")


def _row(name, threat, result):
    s = result["summary"]
    med = lambda k: round(s[k]["median"], 2)  # noqa: E731
    mean = lambda k: f"{s[k]['mean']:.2f} ± {s[k]['std']:.2f}"  # noqa: E731
    return [
        name,
        threat,
        med("psnr"),
        med("ssim"),
        med("aligned_psnr"),
        mean("aligned_psnr"),
        round(s["label_accuracy"]["mean"] * 100, 1),
        round(result["seconds"], 1),
        round(result["iterations_per_second"], 2),
    ]


def result_name(name, seed):
    """The result file of an experiment at a seed (seed 0 keeps the plain name)."""
    return f"attacks_{name}" if int(seed) == 0 else f"attacks_{name}_seed{int(seed)}"


# The settings that define an experiment's result (others, e.g. timings, vary between reruns).
_DEFINING = (
    "attack",
    "threats",
    "model",
    "dataset",
    "num_images",
    "batch_size",
    "offset",
    "target",
    "init",
    "normalization",
    "train_epochs",
    "options",
    "update_options",
    "seed",
    "lock_init",
)


def _cached_report(name, kwargs, seed):
    """The stored report of this experiment at this seed, if its result file holds exactly it."""
    path = common.result_path(result_name(name, seed))
    if not os.path.exists(path):
        return None
    with open(path) as f:
        doc = json.load(f)
    from attacks import study

    defaults = {
        k: p.default
        for k, p in inspect.signature(study.StudyConfig).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    wanted = dict(defaults, **kwargs, seed=int(seed))
    for key in ("options", "update_options"):  # study.run records None as {}
        wanted[key] = wanted[key] or {}
    settings = doc.get("settings", {})
    if "adaptive" in settings.get("threats", []):
        # Results stored before adaptive_strategy existed ran the first adaptive attacker ('joint').
        from attacks import experiment

        default = experiment.ATTACKS[wanted["attack"]].default_adaptive_strategy
        stored = settings.get("adaptive_strategy", "joint")
        if stored != ((wanted["options"] or {}).get("adaptive_strategy") or default):
            return None
    # A setting added since a result was stored counts as its default there.
    if any(
        json.dumps(settings.get(k, defaults.get(k)), sort_keys=True) != json.dumps(wanted.get(k), sort_keys=True)
        for k in _DEFINING
    ):
        return None
    return dict(settings=settings, results=doc["results"])


def choose(names=None, set_name="default", num_images=10):
    """[(name, run() keyword arguments)] of a set, or of the named experiments from any set."""
    sets = _experiments(num_images)
    if not names:
        return sets[set_name]
    known = {n for group in sets.values() for n, _ in group}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"unknown experiments {unknown}; known: {sorted(known)}")
    return list(dict((n, k) for group in sets.values() for n, k in group if n in names).items())


def run_experiments(
    names=None,
    set_name="default",
    num_images=10,
    out_dir="runs/attack_quality",
    seeds=(0,),
    rerun=True,
    stored_only=False,
    log=print,
):
    """Runs the chosen experiments at each seed; returns {(name, seed): report} and writes each
    report to its result file (see `result_name`). Without `rerun`, stored results are reused; with
    `stored_only`, nothing runs and only the stored ones are returned."""
    from attacks import study

    reports = {}
    for name, kwargs in choose(names, set_name, num_images):
        for seed in seeds:
            cached = None if rerun and not stored_only else _cached_report(name, kwargs, seed)
            if cached is not None:
                log(f"== {name} seed {seed}: stored")
                reports[(name, int(seed))] = cached
                continue
            if stored_only:
                log(f"== {name} seed {seed}: not stored yet")
                continue
            log(f"== {name} seed {seed}")
            start = time.perf_counter()
            grid_dir = os.path.join(out_dir, name if int(seed) == 0 else f"{name}_seed{int(seed)}")
            report = study.run(study.StudyConfig(**kwargs, seed=int(seed)), out_dir=grid_dir, log=log)
            payload = dict(
                settings=report["settings"],
                results=report["results"],
                tables=[_table(name, report)],
                notes=[f"grid: {os.path.join(grid_dir, 'grid.png')}"],
            )
            common.write_result(result_name(name, seed), payload, quick=False, duration_s=time.perf_counter() - start)
            reports[(name, int(seed))] = report
    return reports


COLUMNS = [
    "experiment",
    "threat",
    "PSNR median (dB)",
    "SSIM median",
    "aligned PSNR median (dB)",
    "aligned PSNR mean ± std",
    "label acc (%)",
    "seconds",
    "iterations/s",
]


def _table(name, report):
    return {
        "title": f"attack quality: {name}",
        "columns": COLUMNS,
        "rows": [_row(name, t, r) for t, r in report["results"].items()],
    }


def _headline(reports):
    items = []
    for name, report in reports.items():
        for threat, result in report["results"].items():
            s = result["summary"]
            items.append(
                {
                    "metric": f"{name} {threat}: median aligned PSNR",
                    "value": round(s["aligned_psnr"]["median"], 2),
                    "unit": "dB",
                }
            )
    return items


def run(quick):
    """The benchmark runner's entry point: quick = 3 images, default set otherwise."""
    reports = run_experiments(num_images=3 if quick else 10)
    return _payload({name: report for (name, _), report in reports.items()})


NOTES = [
    "Standard PSNR/SSIM on [0, 1] images; aligned PSNR after the least-squares affine fit per image "
    "(train-mode normalisation at batch 1 makes the gradient blind to brightness/contrast).",
    "fixed-key: the attacker's own random key and lock weights; adaptive: gamma/beta per locked channel "
    "optimised with the image; oracle: the victim's key and lock weights.",
    common.SHARED_MACHINE_NOTE,
]


def _payload(reports):
    rows = [row for name, report in reports.items() for row in _table(name, report)["rows"]]
    return {
        "settings": {name: report["settings"] for name, report in reports.items()},
        "results": {name: {t: r["summary"] for t, r in report["results"].items()} for name, report in reports.items()},
        "tables": [
            {
                "title": "attack quality (batch 1 unless stated; aligned = after the best a*x+b fit)",
                "columns": COLUMNS,
                "rows": rows,
            }
        ],
        "headline": _headline(reports),
        "notes": NOTES,
    }


TABLE6_METRICS = ("psnr", "ssim", "aligned_psnr", "label_accuracy", "paper_rmse", "paper_psnr")


TABLE6_THREATS = ("none", "oracle", "fixed-key", "adaptive", "adaptive-key", "adaptive-key (private lock)")


def _compact_rows(results):
    """One row per attack (its `_adaptive_key` and `_private_lock` experiments merged in), one cell per
    threat: aligned PSNR mean ± std (standard PSNR for 'none'), the mean SSIM, the seeds it pools."""
    merged = {}
    for name, by_threat in results.items():
        if name.endswith("_private_lock"):
            by_threat = {f"{t} (private lock)": r for t, r in by_threat.items()}
        merged.setdefault(name.removesuffix("_adaptive_key").removesuffix("_private_lock"), {}).update(by_threat)
    rows = []
    for name, by_threat in merged.items():
        cells = []
        for threat in TABLE6_THREATS:
            r = by_threat.get(threat)
            metric = "psnr" if threat == "none" else "aligned_psnr"
            cells.append(
                "–"
                if r is None
                else f"{r[metric]['mean']:.1f} ± {r[metric]['std']:.1f} ({r['ssim']['mean']:.2f}) [{len(r['seeds'])}]"
            )
        rows.append([name] + cells)
    return rows


def _table6_summary(by_seed):
    """Mean, std and median of each metric over every image of every seed, and the spread of the seed means."""
    pooled = {m: [v for per_image in by_seed.values() for v in per_image[m]] for m in TABLE6_METRICS}
    seed_means = {m: [float(np.mean(per_image[m])) for per_image in by_seed.values()] for m in TABLE6_METRICS}
    return dict(
        seeds=sorted(by_seed),
        images=len(pooled["psnr"]),
        **{
            m: dict(
                mean=float(np.mean(v)),
                std=float(np.std(v)),
                median=float(np.median(v)),
                seed_means=seed_means[m],
                seed_std=float(np.std(seed_means[m])),
            )
            for m, v in pooled.items()
        },
    )


def _table6_row(name, threat, seeds, r):
    def cell(m, f="{:.2f}"):
        return f"{f.format(r[m]['mean'])} ± {f.format(r[m]['std'])}"

    return [
        name,
        threat,
        seeds,
        r["images"],
        cell("psnr"),
        cell("ssim", "{:.3f}"),
        cell("aligned_psnr"),
        f"{r['aligned_psnr']['seed_std']:.2f}",
        f"{100 * r['label_accuracy']['mean']:.1f}",
        cell("paper_rmse", "{:.1f}"),
        cell("paper_psnr"),
    ]


def table6_payload(reports):
    """Per experiment and threat, over every image of every seed: mean ± std of each metric, and the
    spread of the per-seed means (the seed-to-seed variation)."""
    grouped = {}
    for (name, seed), report in sorted(reports.items()):
        for threat, result in report["results"].items():
            grouped.setdefault((name, threat), {})[seed] = result["per_image"]
    rows, results = [], {}
    for (name, threat), by_seed in grouped.items():
        results.setdefault(name, {})[threat] = _table6_summary(by_seed)
        rows.append(_table6_row(name, threat, len(by_seed), results[name][threat]))
    return {
        "settings": {f"{name} seed {seed}": report["settings"] for (name, seed), report in sorted(reports.items())},
        "results": results,
        "tables": [
            {
                "title": "Table 6 analogue, compact: aligned PSNR (dB; standard PSNR for 'none') mean ± std over "
                "all images of all seeds, (mean SSIM), [seeds]",
                "columns": ["experiment"] + list(TABLE6_THREATS),
                "rows": _compact_rows(results),
            },
            {
                "title": "Table 6 analogue: attack x threat, mean ± std over all images of all seeds (batch 1 "
                "single gradients; *update*: multi-step FedAvg client updates in the capture format)",
                "columns": [
                    "experiment",
                    "threat",
                    "seeds",
                    "images",
                    "PSNR (dB)",
                    "SSIM",
                    "aligned PSNR (dB)",
                    "aligned PSNR std of seed means",
                    "label acc (%)",
                    "paper RMSE (0-255)",
                    "paper PSNR (dB)",
                ],
                "rows": rows,
            },
        ],
        "headline": [
            {
                "metric": f"{name} {threat}: mean aligned PSNR over seeds",
                "value": round(results[name][threat]["aligned_psnr"]["mean"], 2),
                "unit": "dB",
            }
            for (name, threat) in grouped
        ],
        "notes": NOTES
        + [
            "A seed sets the victim's weights and key and the attacker's starting points; paper RMSE "
            "and PSNR are the paper's variants (RMSE on 0-255 pixels, 10*log10(255^2/RMSE))."
        ],
    }


def main(argv):
    del argv
    start = time.perf_counter()
    try:
        seeds = [int(s) for s in _SEEDS.value]
        reports = run_experiments(
            _ONLY.value, _SET.value, _NUM_IMAGES.value, _OUT_DIR.value, seeds, _RERUN.value, _STORED_ONLY.value
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if _SET.value == "table6" and not _ONLY.value:
        path = common.write_result(
            "table6", table6_payload(reports), quick=False, duration_s=time.perf_counter() - start
        )
    elif not _ONLY.value and seeds == [0]:
        path = common.write_result(
            "attack_quality",
            _payload({n: r for (n, _), r in reports.items()}),
            quick=False,
            duration_s=time.perf_counter() - start,
        )
    else:
        return
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
