"""The strongest adaptive attacker: each attack under 'none', 'oracle', the first
adaptive attacker ('adaptive' with adaptive_strategy='joint') and the new strategies, on the images and
victims of the stored batch-1 results (untrained LeNet, Fashion-MNIST, images 0-9, seeds 0-2).

  python -m experiments.studies.adaptive_attacker                       # every cell of the default grid
  python -m experiments.studies.adaptive_attacker --aa_attacks=grnn --aa_variants=adaptive:relearn --aa_seeds=0
  python -m experiments.studies.adaptive_attacker --aa_tabulate_only    # the table from the cache, nothing runs

A cell is (attack, variant, seed): it runs in its own process (`--aa_cell`), attacks the cell's images
not cached yet in one batched call, and writes one cache file per image under
runs/adaptive_attacker/cache/ (a rerun skips cached images: the run resumes). 'none', 'oracle' and
'adaptive:joint' cells with the stored results' options are imported from results/attacks_<attack>_
fashion_mnist[_seedN].json instead of rerun. The table gives, per attack and variant over the seeds, n,
the share recovered (aligned SSIM >= 0.6) with its Wilson 95 % interval, then mean aligned PSNR / SSIM;
then, per image, the best over attacks and strategies: an UPPER BOUND (an oracle picks, by the truth),
never a real attacker's success rate. Restarts inside a cell are chosen by the attack's own loss.
"""

import json
import os
import sys
import time

from absl import app, flags
import numpy as np
import tensorflow  # noqa: F401  (before absl's main, as experiments.studies.attack_quality)

from experiments import cells, common

NAME = "adaptive_attacker"
DATASET, MODEL, NUM_IMAGES = "fashion_mnist", "lenet", 10
# The stored results' options (experiments.studies.attack_quality's 'full' set), which every variant keeps.
BASE_OPTIONS = {
    "dlg": dict(iterations=1000, restarts=1),
    "idlg": dict(iterations=1500, restarts=2),
    "ig": dict(iterations=1500, restarts=2, tv=1e-4, learning_rate=0.1),
    "grnn": dict(iterations=1500, learning_rate=1e-3),
}
# variant -> (threat, extra attack options). 'adaptive:<strategy>' variants set adaptive_strategy.
VARIANTS = {
    "none": ("none", {}),
    "oracle": ("oracle", {}),
    "adaptive:joint": ("adaptive", {"adaptive_strategy": "joint"}),
    "adaptive:prior": ("adaptive", {"adaptive_strategy": "prior"}),
    "adaptive:mixed": ("adaptive", {"adaptive_strategy": "mixed"}),
    "adaptive:relearn": ("adaptive", {"adaptive_strategy": "relearn"}),
    "adaptive:relearn-mixed": ("adaptive", {"adaptive_strategy": "relearn-mixed"}),
    "adaptive:relearn-uniform": ("adaptive", {"adaptive_strategy": "relearn-uniform"}),
    # GRNN's lock latents at its generator's step (isolates the lock step size).
    "adaptive:relearn/lock-lr-1e-3": ("adaptive", {"adaptive_strategy": "relearn", "lock_learning_rate": 1e-3}),
    "adaptive:joint/lock-lr-1e-2": ("adaptive", {"adaptive_strategy": "joint", "lock_learning_rate": 1e-2}),
    "adaptive:relearn/lock-lr-3e-2": ("adaptive", {"adaptive_strategy": "relearn", "lock_learning_rate": 3e-2}),
    # A TV prior for the L-BFGS attacks (DLG has none): the adaptive problem has low-loss wrong images.
    "adaptive:relearn/tv-1e-3": ("adaptive", {"adaptive_strategy": "relearn", "tv": 1e-3}),
    # Four restarts instead of the stored one or two (more compute than 'oracle' had).
    "adaptive:relearn-mixed/restarts-4": ("adaptive", {"adaptive_strategy": "relearn-mixed", "restarts": 4}),
}
STORED_VARIANTS = {"none": "none", "oracle": "oracle", "adaptive:joint": "adaptive"}  # variant -> stored threat
DEFAULT_VARIANTS = ["none", "oracle", "adaptive:joint", "adaptive:relearn"]

_ATTACKS = flags.DEFINE_list("aa_attacks", ["ig", "grnn", "idlg", "dlg"], "Attacks to run.")
_VARIANTS = flags.DEFINE_list("aa_variants", DEFAULT_VARIANTS, f"Variants, from {sorted(VARIANTS)}.")
_SEEDS = flags.DEFINE_list("aa_seeds", ["0", "1", "2"], "Seeds (victim weights, key, attack starts).")
_CACHE = flags.DEFINE_string("aa_cache", "runs/adaptive_attacker/cache", "Per-image cache folder.")
_CELL = flags.DEFINE_string("aa_cell", None, "Internal: run one cell 'attack|variant|seed' in this process.")
_TABULATE_ONLY = flags.DEFINE_bool("aa_tabulate_only", False, "Run nothing; tabulate the cache.")
_WORKERS = flags.DEFINE_integer(
    "aa_workers", cells.DEFAULT_WORKERS, "Cells run at a time, each in its own process.", lower_bound=1
)
_TABLE_VARIANTS = flags.DEFINE_list(
    "aa_table_variants", [], "Variants to tabulate (default: every variant in the cache for the chosen attacks)."
)


def options_of(attack, variant):
    if attack not in BASE_OPTIONS:
        raise ValueError(f"unknown attack {attack!r}; choose from {tuple(BASE_OPTIONS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    return dict(BASE_OPTIONS[attack], **VARIANTS[variant][1])


def _layout(cell):
    return os.path.join(cell.attack, cell.threat.replace(":", "_").replace("/", "__"), f"seed{cell.seed}")


def records(cache):
    """The cells' records (`experiments.cells.RecordStore`): one file per image."""
    return cells.RecordStore(cache, _layout, "{:03d}.json", indent=2, trailing_newline=True)


def cell(attack, variant, seed):
    """The engine's cell: `attack` on the batch-1 LeNet victims of `seed` under `variant` (a threat and options)."""
    return cells.Cell(NAME, MODEL, variant, attack, seed)


def cache_path(cache, attack, variant, seed, image):
    return records(cache).path(cell(attack, variant, seed), image)


def cached(cache, attack, variant, seed):
    """{image index: entry} of the cached images of one cell."""
    return records(cache).load(cell(attack, variant, seed), range(NUM_IMAGES))


def _write_entry(cache, attack, variant, seed, image, entry):
    records(cache).write(cell(attack, variant, seed), image, entry)


def import_stored(cache, attack, variant, seed, results_dir=common.RESULTS_DIR):
    """Copies a stored result's per-image metrics into the cache when its settings are the cell's; True if done."""
    if variant not in STORED_VARIANTS:
        return False
    stem = f"attacks_{attack}_{DATASET}" + ("" if int(seed) == 0 else f"_seed{int(seed)}")
    path = os.path.join(results_dir, f"{stem}.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        doc = json.load(f)
    settings, threat = doc.get("settings", {}), STORED_VARIANTS[variant]
    if (
        settings.get("options") != BASE_OPTIONS[attack]
        or settings.get("seed") != int(seed)
        or settings.get("num_images") != NUM_IMAGES
        or settings.get("offset", 0) != 0
        or settings.get("batch_size", 1) != 1
        or threat not in doc.get("results", {})
    ):
        return False
    per_image = doc["results"][threat]["per_image"]
    for image in range(NUM_IMAGES):
        entry = {name: values[image] for name, values in per_image.items()}
        entry.update(
            source=f"results/{stem}.json (commit {doc.get('git_commit', '?')[:12]})", options=settings["options"]
        )
        _write_entry(cache, attack, variant, seed, image, entry)
    return True


def run_cell(cache, attack, variant, seed, log=print):
    """Attacks the cell's images not cached yet (one batched call) and caches each image's metrics."""
    import tensorflow as tf

    from attacks import cases, study

    tf.get_logger().setLevel("ERROR")  # pfor's per-op fallback warnings would flood the log
    threat, _ = VARIANTS[variant]

    def progress(done, total, losses):
        log(f"[{attack}/{variant}/seed {seed}] {done}/{total} best loss median {np.median(losses):.3g}")

    def attack_images(missing):
        data_set, input_shape, images, labels = study.load_images(DATASET, MODEL, NUM_IMAGES)
        victims = cases.build_victims(
            MODEL, input_shape, data_set.num_classes, "pytorch", seed, "batch", key_seed=seed + 1, threats=[threat]
        )
        victim = victims["plain" if threat == "none" else "locked"]
        payload, _ = cases.simulate_clients(victim, images[missing], labels[missing], 1)
        secret = cases.threat_secret(threat, victim)
        options = options_of(attack, variant)
        entries = attack_entries(
            attack, payload, threat, secret, options, seed, images[missing], labels[missing], progress
        )
        for image, entry in zip(missing, entries):
            yield image, dict(entry, source="experiments.studies.adaptive_attacker")

    cells.run_pending(records(cache), cell(attack, variant, seed), range(NUM_IMAGES), attack_images, log=log)


def attack_entries(
    attack, payload, threat, secret, options, seed, images, labels, progress=None, per_client=1, oracle_labels=None
):
    """Attacks `payload` (the attack sees it and the secret its threat assumes, never the truth), then scores
    each client's reconstruction against its `per_client` true images (Hungarian-matched); returns one cache
    entry per image, in the images' order (`oracle_labels`: see experiment.run_attack)."""
    from attacks import experiment

    reconstructions, seconds = experiment.run_attack(
        attack, payload, threat, secret, options, seed, progress, oracle_labels=oracle_labels
    )
    per_image = experiment.evaluate(reconstructions, images, labels, per_client)
    entries = []
    for k in range(len(images)):
        rec = reconstructions[k // per_client]
        entry = {name: values[k] for name, values in per_image.items()}
        entry.update(
            loss=rec.loss,
            restart_losses=rec.info["restart_losses"],
            best_restart=rec.info["best_restart"],
            dead_channels=rec.info.get("dead_channels"),
            lock_estimate=rec.info.get("lock_estimate"),
            adaptive_strategy=rec.info.get("adaptive_strategy"),
            options=options,
            images_in_call=len(images),
            seconds_per_image=seconds / len(images),
            git_commit=common.git_commit(),
        )
        entries.append(entry)
    return entries


def score(entries):
    """Success rates (attacks.metrics) and mean/std aligned PSNR and SSIM of a list of per-image entries."""
    from attacks import metrics

    per_image = {name: np.array([e[name] for e in entries], float) for name in ("aligned_psnr", "aligned_ssim")}
    summary = metrics.summarize(per_image)
    return {
        "n": len(entries),
        **metrics.success_summary(per_image),
        "aligned_psnr": summary["aligned_psnr"],
        "aligned_ssim": summary["aligned_ssim"],
    }


def best_of(by_source):
    """Per image, the best aligned PSNR and SSIM over several sources ({source: [entries]}, same images in
    the same order). It reads the truth to choose: an UPPER BOUND, never an attacker's success rate."""
    sources = list(by_source.values())
    return [
        {name: float(np.nanmax([s[i][name] for s in sources])) for name in ("aligned_psnr", "aligned_ssim")}
        for i in range(len(sources[0]))
    ]


COLUMNS = [
    "attack",
    "variant",
    "seeds",
    "n",
    "recovered: aligned SSIM >= 0.6",
    "95 % interval",
    "aligned PSNR (dB) mean ± std",
    "aligned SSIM mean ± std",
    "of oracle's recovered",
]
UPPER_BOUND_LABEL = "UPPER BOUND (best per image, chosen by the truth)"


def _row(attack, variant, seeds, entry, oracle=None):
    rate = entry["ssim"]
    psnr, ssim = entry["aligned_psnr"], entry["aligned_ssim"]
    ratio = (
        "–" if not oracle or not oracle["ssim"]["recovered"] else f"{rate['recovered']}/{oracle['ssim']['recovered']}"
    )
    return [
        attack,
        variant,
        ", ".join(str(s) for s in seeds),
        entry["n"],
        f"{rate['recovered']}/{rate['n']} = {100 * rate['rate']:.0f} %",
        f"[{100 * rate['low']:.0f}, {100 * rate['high']:.0f}] %",
        f"{psnr['mean']:.1f} ± {psnr['std']:.1f}",
        f"{ssim['mean']:.2f} ± {ssim['std']:.2f}",
        ratio,
    ]


def tabulate(cache, attacks, seeds, variants=None):
    """The payload: per attack and variant pooled over `seeds` (only complete cells), then the upper bounds."""
    complete = {}
    for attack in attacks:
        for variant in variants or VARIANTS:
            stored = {s: cached(cache, attack, variant, s) for s in seeds}
            done = [s for s in seeds if len(stored[s]) == NUM_IMAGES]
            if done:
                complete[(attack, variant)] = {s: [stored[s][i] for i in range(NUM_IMAGES)] for s in done}
    results, rows = {}, []
    for (attack, variant), by_seed in complete.items():
        entries = [e for s in sorted(by_seed) for e in by_seed[s]]
        results.setdefault(attack, {})[variant] = dict(
            score(entries), seeds=sorted(by_seed), options=entries[0]["options"]
        )
    for attack, by_variant in results.items():
        for variant, entry in by_variant.items():
            oracle = None
            if variant.startswith("adaptive") and set(entry["seeds"]) <= set(complete.get((attack, "oracle"), {})):
                # 'oracle' on the same seeds as this variant
                oracle = score([e for s in entry["seeds"] for e in complete[(attack, "oracle")][s]])
            rows.append(_row(attack, variant, entry["seeds"], entry, oracle))
    bounds, bound_rows = upper_bound_rows(complete, attacks, seeds)
    return _payload(seeds, results, rows, bounds, bound_rows)


def upper_bound_rows(complete, attacks, seeds):
    """({name: score}, table rows) of the upper bounds: per image the best of a group of complete cells."""
    bounds, bound_rows = {}, []
    # Upper bounds over the cells complete at every seed (single-seed ablations would shrink them to seed 0).
    everywhere = {k for k, v in complete.items() if set(v) == set(seeds)}
    adaptive = {k: v for k, v in complete.items() if k[1].startswith("adaptive") and k in everywhere}
    groups = {
        f"{attack}: best over its adaptive strategies": [k for k in adaptive if k[0] == attack] for attack in attacks
    }
    groups["all attacks: best over attacks and adaptive strategies"] = list(adaptive)
    groups["all attacks: best over attacks, first adaptive attacker ('joint') only"] = [
        k for k in adaptive if k[1] == "adaptive:joint"
    ]
    groups["all attacks: best over attacks under 'oracle'"] = [k for k in everywhere if k[1] == "oracle"]
    for name, keys in groups.items():
        if len(keys) < 2:
            continue
        seeds_common = sorted(set.intersection(*(set(complete[k]) for k in keys)))
        if not seeds_common:
            continue
        best = [e for s in seeds_common for e in best_of({k: complete[k][s] for k in keys})]
        bounds[name] = dict(
            score(best), seeds=seeds_common, sources=[f"{a}/{v}" for a, v in keys], label=UPPER_BOUND_LABEL
        )
        bound_rows.append(
            [f"{UPPER_BOUND_LABEL}: {name}", ", ".join(f"{a}/{v}" for a, v in keys)]
            + _row("", "", seeds_common, bounds[name])[2:-1]
        )
    return bounds, bound_rows


def _payload(seeds, results, rows, bounds, bound_rows):
    return {
        "settings": {
            "model": MODEL,
            "dataset": DATASET,
            "images": f"training images 0-{NUM_IMAGES - 1}, batch 1 single-step gradients, untrained (PyTorch init)",
            "base_options": BASE_OPTIONS,
            "variants": {v: {"threat": t, "options": o} for v, (t, o) in VARIANTS.items()},
            "seeds": [int(s) for s in seeds],
            "criterion": "aligned SSIM >= 0.6 (attacks.metrics.CRITERIA['ssim']); Wilson 95 % interval",
        },
        "results": {"by_attack": results, "upper_bound": bounds},
        "tables": [
            {
                "title": "Success by attack and threat/strategy (seeds pooled; n = images x seeds)",
                "columns": COLUMNS,
                "rows": rows,
            },
            {
                "title": f"{UPPER_BOUND_LABEL}: not a real attacker's success rate",
                "columns": ["upper bound", "sources"] + COLUMNS[2:-1],
                "rows": bound_rows,
            },
        ],
        "headline": [
            {
                "metric": f"{a} {v}: recovered (aligned SSIM >= 0.6), n = {e['n']}",
                "value": round(100 * e["ssim"]["rate"], 1),
                "unit": "%",
            }
            for a, by_variant in results.items()
            for v, e in by_variant.items()
        ],
        "notes": [
            "Victims and images as the stored results (attacks_<attack>_fashion_mnist[_seedN].json): the seed sets the "
            "victim's weights and key and the attacker's starts; the 10 images are the same for every seed, so n "
            "counts attacks, not distinct images.",
            "'none', 'oracle' and 'adaptive:joint' (the first adaptive attacker) are imported from those stored files "
            "when their options match; the other variants were run by this module, one process per cell.",
            "adaptive strategies (attacks.base.ADAPTIVE_STRATEGIES): the attacker never sees the key, the lock weights "
            "or the images; each image's restart is the one with the lowest attack objective.",
            "'of oracle's recovered': images recovered under this variant / images recovered under 'oracle' "
            "(same attack, same seeds).",
            "Upper bound rows pick, per image, the best of several attacks or strategies by the truth: an oracle "
            "selection, an upper bound on what those attackers recover, never a success rate of one of them.",
            common.SHARED_MACHINE_NOTE,
        ],
    }


def run_cells(cache, attacks, variants, seeds, workers=cells.DEFAULT_WORKERS, log=print):
    """Imports the cells a stored result holds (`import_stored`) and runs the others that are not cached, each
    in its own process (`--aa_cell`) in the engine's pool; a cell resumes per image."""
    jobs = []
    for attack in attacks:
        for variant in variants:
            for seed in seeds:
                if len(cached(cache, attack, variant, seed)) == NUM_IMAGES:
                    continue
                if import_stored(cache, attack, variant, seed):
                    log(f"== {attack}/{variant}/seed {seed}: imported from the stored result")
                    continue
                jobs.append(cell_job(cache, attack, variant, seed))
    try:
        cells.run_jobs(jobs, workers, log)
    except RuntimeError as e:
        raise SystemExit(f"{e}; rerun to resume") from None


def cell_job(cache, attack, variant, seed):
    argument = f"{attack}|{variant}|{seed}"
    return cells.cell_job(
        records(cache),
        cell(attack, variant, seed),
        range(NUM_IMAGES),
        cells.module_command("experiments.studies.adaptive_attacker", f"--aa_cell={argument}", f"--aa_cache={cache}"),
        os.path.join(cache, "logs", argument.replace("|", "_").replace(":", "_").replace("/", "__") + ".log"),
        name=f"{attack}/{variant}/seed {seed}",
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cache = _CACHE.value
    if _CELL.value:
        attack, variant, seed = _CELL.value.split("|")
        run_cell(cache, attack, variant, int(seed))
        return
    try:
        seeds = [int(s) for s in _SEEDS.value]
        for attack in _ATTACKS.value:
            for variant in _VARIANTS.value:
                options_of(attack, variant)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    start = time.perf_counter()
    if not _TABULATE_ONLY.value:
        run_cells(cache, _ATTACKS.value, _VARIANTS.value, seeds, _WORKERS.value)
    payload = tabulate(cache, _ATTACKS.value, seeds, _TABLE_VARIANTS.value or None)

    try:
        path, markdown = cells.publish(NAME, payload, time.perf_counter() - start, cache)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {path} and {markdown}")


if __name__ == "__main__":
    app.run(main)
