"""Attack success rates of every stored attack result, re-tabulated without re-running an attack.

  python -m experiments.studies.success_rates [--results_dir=...]   # -> <results_dir>/success_rates.json and .md

Reads each attacks_*.json in the results folder (per-image aligned PSNR and SSIM under
results[threat]['per_image']) and gives, per setting and threat: n, the share of images recovered
(aligned SSIM >= 0.6; separately aligned PSNR >= 20 dB) with Wilson 95 % intervals, then mean/std
aligned PSNR and SSIM (attacks.metrics). A setting pools its seed files (attacks_<setting>.json,
_seed1, _seed2, ...) when their settings agree apart from the seed; every file also gets its own row.
Rows taking the best of several attacks per image are labelled as an upper bound.
"""

import re
import time

from absl import app, flags
import numpy as np

from attacks import metrics
from experiments import cells, common

NAME = "success_rates"
_RESULTS_DIR = flags.DEFINE_string(
    "results_dir", common.RESULTS_DIR, "Where the result JSONs are.", allow_override=True
)  # as in experiments.run and experiments.report.document
PREFIX = "attacks_"
SEED_SUFFIX = re.compile(r"_seed(\d+)$")
UPPER_BOUND = "upper bound (best of attacks per image, oracle choice)"
LABEL_FLOOR = "labels alone: class mean (a floor)"
# Settings that may differ between the seed files of one setting, or between the attacks of an upper bound.
PER_RUN_SETTINGS = ("seed", "total_seconds")
PER_ATTACK_SETTINGS = ("attack", "options", "threats", "total_seconds")
SCORES = ("aligned_psnr", "aligned_ssim")
COLUMNS = [
    "setting",
    "threat",
    "seeds",
    "n",
    "recovered: aligned SSIM >= 0.6",
    "95 % interval",
    "recovered: aligned PSNR >= 20 dB",
    "95 % interval",
    "aligned PSNR (dB) mean ± std",
    "aligned SSIM mean ± std",
]
NOTES = [
    "recovered: an image whose aligned SSIM is >= 0.6 (the threshold FedKL's code names), or separately whose "
    "aligned PSNR is >= 20 dB (Dimitrov et al.'s FEMNIST threshold); aligned = after the least-squares a*x+b fit "
    "per image. Intervals: Wilson 95 % score intervals.",
    "Batches (batch_size > 1, the *update* settings) were scored at attack time after a one-to-one (Hungarian) "
    "matching of reconstructions to true images by MSE (attacks.experiment.evaluate); the JSON files hold no "
    "reconstructions, so they are not re-matched here. Restarts are chosen by the attack's own loss.",
    f"{LABEL_FLOOR}: each attacked image replaced by the mean image of its class over the test split (no client "
    "trains on it), scored as a reconstruction: what an attacker that knows only the labels gets without the "
    "update. Not an attack; success rates near it show little beyond the labels.",
    "*_adaptive_key: the adaptive-key attacker against clients starting from model_fn's lock weights (shared lock "
    "init); *_private_lock: against clients that drew their lock weights privately (it knows only model_fn's).",
]


def setting_name(stem):
    """'attacks_ig_fashion_mnist_seed1' -> 'ig_fashion_mnist'."""
    return SEED_SUFFIX.sub("", stem[len(PREFIX) :])


def per_threat(doc):
    """{threat: per-image metrics} of one attacks_*.json ('capture/threat' keys give the threat)."""
    results = doc.get("results", {})
    if {"settings", "results"} <= set(results):  # a study report stored whole inside the envelope
        results = results["results"]
    return {
        key.rsplit("/", 1)[-1]: value["per_image"]
        for key, value in results.items()
        if isinstance(value, dict) and all(s in value.get("per_image", {}) for s in SCORES)
    }


def run_settings(doc):
    results = doc.get("results", {})
    return doc.get("settings") or (results.get("settings") if isinstance(results, dict) else None) or {}


def _without(settings, keys):
    return {k: v for k, v in settings.items() if k not in keys}


def load_runs(docs):
    """{file stem: {'setting', 'seed', 'settings', 'per_threat'}} of every attacks_*.json holding per-image metrics."""
    runs = {}
    for stem, doc in docs.items():
        if stem.startswith(PREFIX) and isinstance(doc, dict):
            threats = per_threat(doc)
            if threats:
                settings = run_settings(doc)
                runs[stem] = {
                    "setting": setting_name(stem),
                    "seed": settings.get("seed"),
                    "settings": settings,
                    "per_threat": threats,
                }
    return runs


def score(per_image_list):
    """Success rates and mean/std of the aligned scores over the concatenated per-image metrics."""
    pooled = {s: np.concatenate([np.asarray(p[s], float) for p in per_image_list]) for s in SCORES}
    summary = metrics.summarize(pooled)
    return {"n": int(len(pooled["aligned_ssim"])), **metrics.success_summary(pooled), **{s: summary[s] for s in SCORES}}


def _percent(rate):
    return f"{rate['recovered']}/{rate['n']} = {100 * rate['rate']:.0f} %"


def _interval(rate):
    return f"[{100 * rate['low']:.0f}, {100 * rate['high']:.0f}] %"


def row(setting, threat, seeds, entry):
    psnr, ssim = entry["aligned_psnr"], entry["aligned_ssim"]
    seeds = ", ".join(str(s) for s in seeds if s is not None) or "–"
    return [
        setting,
        threat,
        seeds,
        entry["n"],
        _percent(entry["ssim"]),
        _interval(entry["ssim"]),
        _percent(entry["psnr"]),
        _interval(entry["psnr"]),
        f"{psnr['mean']:.1f} ± {psnr['std']:.1f}",
        f"{ssim['mean']:.2f} ± {ssim['std']:.2f}",
    ]


def group_settings(runs):
    """{setting: [file stems]} pooling the seed files of one setting, and the notes of settings not pooled
    (their files disagree on more than the seed: each file becomes its own setting)."""
    groups, notes = {}, []
    for stem, run in runs.items():
        groups.setdefault(run["setting"], []).append(stem)
    pooled = {}
    for setting, stems in groups.items():
        variants = {repr(sorted(_without(runs[s]["settings"], PER_RUN_SETTINGS).items())) for s in stems}
        if len(variants) == 1:
            pooled[setting] = stems
        else:
            notes.append(f"{setting}: files {', '.join(stems)} differ in more than the seed; not pooled.")
            pooled.update({stem[len(PREFIX) :]: [stem] for stem in stems})
    return pooled, notes


def shares_images(stems, runs):
    """True when a setting's seed files attack the very same images (then n counts attacks, not distinct images)."""
    if len(stems) < 2:
        return False
    first = runs[stems[0]]["settings"]
    return first.get("true_labels") is not None and all(
        runs[s]["settings"].get(k) == first.get(k) for s in stems for k in ("offset", "num_images", "true_labels")
    )


def upper_bounds(runs, pooled):
    """Per group of settings that differ only in the attack (same victims, images and seeds): per image,
    the best of the attacks under each threat, pooled over seeds."""
    families = {}
    for setting, stems in pooled.items():
        settings = runs[stems[0]]["settings"]
        attack = settings.get("attack")
        if not attack or not setting.startswith(f"{attack}_"):
            continue
        key = (
            setting[len(attack) + 1 :],
            repr(sorted(_without(settings, PER_ATTACK_SETTINGS + PER_RUN_SETTINGS).items())),
        )
        families.setdefault(key, {})[attack] = {runs[s]["seed"]: runs[s]["per_threat"] for s in stems}
    bounds = {}
    for (rest, _), by_attack in families.items():
        seeds = set.intersection(*(set(by_seed) for by_seed in by_attack.values()))
        if len(by_attack) < 2 or not seeds:
            continue
        threats = [
            t
            for t in next(iter(by_attack.values()))[min(seeds)]
            if all(t in by_seed[s] for by_seed in by_attack.values() for s in seeds)
        ]
        for threat in threats:
            best = []
            for seed in sorted(seeds):
                per_attack = [by_seed[seed][threat] for by_seed in by_attack.values()]
                best.append({s: np.fmax.reduce([np.asarray(p[s], float) for p in per_attack]) for s in SCORES})
            bounds.setdefault(rest, {})[threat] = dict(score(best), attacks=sorted(by_attack), seeds=sorted(seeds))
    return bounds


def label_floors(runs, pooled):
    """({setting: score entry} of `attacks.study.label_floor` on the images a setting's files attacked, notes on
    the settings it cannot score: their data is not on disk, or is not the images the files name)."""
    from attacks import study
    from tfkl import data

    floors, notes, datasets, class_means = {}, set(), {}, {}
    for setting, stems in pooled.items():
        per_image = []
        for stem in stems:
            settings = runs[stem]["settings"]
            if not all(k in settings for k in ("dataset", "model", "num_images", "offset", "true_labels")):
                break
            name = settings["dataset"]
            try:
                datasets[name] = datasets.get(name) or study.load_data(name)
                input_shape, images, labels = study.training_images(
                    datasets[name], settings["model"], settings["num_images"], settings["offset"]
                )
            except (data.DataUnavailableError, ValueError) as e:
                notes.add(f"{LABEL_FLOOR}: not scored for {name} ({e})")
                break
            if list(labels) != list(settings["true_labels"]):
                notes.add(f"{LABEL_FLOOR}: not scored where the files' labels are not those of {name} on disk")
                break
            if (name, input_shape) not in class_means:
                class_means[name, input_shape] = study.test_class_means(datasets[name], input_shape)
            scores = study.label_floor(class_means[name, input_shape], images, labels)
            per_image.append({k: scores[k] for k in SCORES})
        else:
            floors[setting] = dict(score(per_image), seeds=[runs[stem]["seed"] for stem in stems])
    return floors, sorted(notes)


def privacy_utility(doc):
    """Per defence and server view of privacy_utility.json: each attack/threat's success, and the best of the
    attacks and threats without the key per image (an upper bound); (results, table rows)."""
    results, rows = {}, []
    for defence, entry in doc.get("results", {}).get("defences", {}).items():
        for view, privacy in entry.get("privacy", {}).items():
            attacks = {name: a["per_image"] for name, a in privacy.get("attacks", {}).items() if "per_image" in a}
            scored = {name: score([per_image]) for name, per_image in attacks.items()}
            keyless = [per_image for name, per_image in attacks.items() if not name.endswith("/oracle")]
            if len(keyless) > 1:
                scored["upper_bound"] = score(
                    [{s: np.fmax.reduce([np.asarray(p[s], float) for p in keyless]) for s in SCORES}]
                )
            results.setdefault(defence, {})[view] = scored
            rows += [
                row(
                    f"{'upper bound: ' if name == 'upper_bound' else ''}{defence} ({view})",
                    "best of the attacks without the key" if name == "upper_bound" else name,
                    [],
                    e,
                )
                for name, e in scored.items()
            ]
    return results, rows


def tabulate(results_dir):
    """The benchmark payload: success-rate tables of every attacks_*.json (and privacy_utility.json) in
    `results_dir`: per setting, its seed files pooled (`pooled_rows`), per file, the upper bounds."""
    docs = common.load_results(results_dir)
    runs = load_runs(docs)
    pooled, notes = group_settings(runs)
    floors, floor_notes = label_floors(runs, pooled)
    notes += floor_notes
    by_setting, setting_rows, headline, shared = pooled_rows(runs, pooled, floors)
    by_file, file_rows = {}, []
    for stem, run in sorted(runs.items()):
        for threat, per_image in run["per_threat"].items():
            by_file.setdefault(stem, {})[threat] = score([per_image])
            file_rows.append(row(stem, threat, [run["seed"]], by_file[stem][threat]))
    if shared:
        notes.append(
            "The seed files of " + ", ".join(shared) + " attack the same images under different victim "
            "weights, key and attacker start: n counts attacks, and the interval treats them as "
            "independent trials."
        )
    bounds = upper_bounds(runs, pooled)
    bound_rows = [
        row(f"upper bound: {rest} ({', '.join(e['attacks'])})", threat, e["seeds"], e)
        for rest, by_threat in sorted(bounds.items())
        for threat, e in by_threat.items()
    ]
    privacy, privacy_rows = privacy_utility(docs.get("privacy_utility", {}))
    if not runs:
        notes.append(f"no attacks_*.json with per-image metrics in {results_dir}")
    privacy_title = (
        "privacy_utility.json: attack success per defence and server view (round 1, one image "
        "per client update); upper bound rows: " + UPPER_BOUND
    )
    return {
        "settings": {
            "criteria": {c: {"metric": m, "at_least": t} for c, (m, t) in metrics.CRITERIA.items()},
            "interval": "Wilson score, 95 %",
            "files": len(runs),
        },
        "results": {
            "by_setting": by_setting,
            "by_file": by_file,
            "upper_bound": bounds,
            "label_floor": floors,
            "privacy_utility": privacy,
        },
        "tables": [
            {"title": "Attack success by setting (seed files pooled)", "columns": COLUMNS, "rows": setting_rows},
            {"title": UPPER_BOUND + ", seeds pooled", "columns": COLUMNS, "rows": bound_rows},
            {"title": "Attack success per file", "columns": COLUMNS, "rows": file_rows},
        ]
        + ([{"title": privacy_title, "columns": COLUMNS, "rows": privacy_rows}] if privacy_rows else []),
        "headline": headline,
        "notes": NOTES + notes,
    }


def pooled_rows(runs, pooled, floors):
    """(by setting {threat: entry}, table rows, headline items, settings whose seed files share their images)
    of every setting, its seed files pooled, the label floor's row first."""
    by_setting, setting_rows, headline, shared = {}, [], [], []
    for setting, stems in sorted(pooled.items()):
        seeds = [runs[s]["seed"] for s in stems]
        if setting in floors:
            setting_rows.append(row(setting, LABEL_FLOOR, seeds, floors[setting]))
        threats = list(dict.fromkeys(t for s in stems for t in runs[s]["per_threat"]))
        for threat in threats:
            entry = dict(
                score([runs[s]["per_threat"][threat] for s in stems if threat in runs[s]["per_threat"]]),
                files=sorted(f"{s}.json" for s in stems),
                seeds=seeds,
            )
            by_setting.setdefault(setting, {})[threat] = entry
            setting_rows.append(row(setting, threat, seeds, entry))
            if len(stems) > 1:
                headline.append(
                    {
                        "metric": f"{setting} {threat}: recovered (aligned SSIM >= 0.6), n = {entry['n']}",
                        "value": round(100 * entry["ssim"]["rate"], 1),
                        "unit": "%",
                    }
                )
        if shares_images(stems, runs):
            shared.append(f"{setting} ({runs[stems[0]]['settings'].get('num_images')} images x {len(stems)} seeds)")
    return by_setting, setting_rows, headline, shared


def run(quick):
    """The benchmark runner's entry point (`quick` changes nothing: no attack runs)."""
    del quick
    return tabulate(_RESULTS_DIR.value)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    start = time.perf_counter()
    results_dir = _RESULTS_DIR.value
    payload = tabulate(results_dir)
    path, markdown = cells.publish(NAME, payload, time.perf_counter() - start, results_dir, results_dir)
    print(f"wrote {path} and {markdown}")


if __name__ == "__main__":
    app.run(main)
