"""The regimes' tables, from their records alone: success rates against the labels-alone floor, beyond it,
detail, cost, label counts, sizes and budget curves, regime M's rows (results/rounds.json), and the labelled
grids where reconstructions are stored."""

import dataclasses
import functools
import json
import os
import time

import numpy as np

from experiments import cells, common
from experiments.studies.regimes import (
    BEYOND_FLOOR,
    LABEL_FLOOR,
    LABEL_FLOOR_KEY,
    NAME,
    ORDER_ORACLE,
    RECORDS_DIR,
    REGIMES,
    SEEDS,
    THREAT_LABELS,
    THREAT_ORDER,
    WORK_DIR,
    Store,
    beyond_floor,
    label_floor,
    load_cell,
    load_dataset,
    nothing_to_measure,
    reconstruction_path,
    score_summary,
    seed_images,
)


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
        score_summary(entry),
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


def _sizes_row(regime, data_dir=None):
    """[regime, pixel values per client, numbers in its update (the plain model's trainable weights)]."""
    from tfkl import models

    input_shape = models.input_shape(regime.model, load_dataset(data_dir))
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


def published_pooled(results_dir=common.RESULTS_DIR):
    """results/rounds.json (regime M), or None before that study has published."""
    path = os.path.join(results_dir, "rounds.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def publish_main_table(start, store=None, seeds=SEEDS, data_dir=None, results_name=NAME, log=print):
    """Tabulates every regime stored in `store` (default: the repository's records) at `seeds` with regime M's
    rows and publishes results/<results_name>.json and .md (what the program does after its cells;
    experiments.studies.rounds calls it when its results change)."""
    store = store or Store(RECORDS_DIR, WORK_DIR)
    pooled = published_pooled() if results_name == NAME else None
    payload = tabulate(store, list(REGIMES.values()), list(seeds), THREAT_ORDER, data_dir, log, pooled)
    return cells.publish(results_name, payload, time.perf_counter() - start, store.records)
