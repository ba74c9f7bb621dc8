"""Running attacks as experiments: the attack registry, threat models side by side, scoring, PNG grids.

`run_threats` attacks the same images under several threat models: 'none' against the backbone
without the lock, the others against the identical backbone with it (the victims are `attacks.cases`).
`run_attack` is the attack proper: it receives the server's payload only; scoring against the true
data comes after. `attack_captures` is the demo's entry point: attack captured updates (with and
without the lock) and write a grid and a table.
"""

import dataclasses
import json
import os
import time

import numpy as np
import tensorflow as tf

from attacks import base, cases, dlg, grids, grnn, ig, metrics
from attacks import model as model_lib
from tfkl import capture as capture_lib

ATTACKS = {"dlg": dlg.DLG, "idlg": dlg.IDLG, "ig": ig.InvertingGradients, "grnn": grnn.GRNN}  # names.ATTACKS


def attack_config(name, options=None, **overrides):
    """The config of attack `name` from `options`: its config object, or a plain dict of hyperparameters (as
    the binaries and benchmarks pass them), with `overrides` set."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {tuple(ATTACKS)}")
    config_type = ATTACKS[name].Config
    if isinstance(options, base.AttackConfig):
        if type(options) is not config_type:
            raise TypeError(f"attack {name!r} takes a {config_type.__name__}, got {type(options).__name__}")
        return dataclasses.replace(options, **overrides)
    return config_type(**dict(options or {}, **overrides))


def build_attack(name, attacker, config=None, **options):
    """An attack by name ('dlg', 'idlg', 'ig', 'grnn') on `attacker`, with its config or keyword options."""
    return ATTACKS[name](attacker, attack_config(name, config, **options))


def evaluate(reconstructions, images, labels, batch_size, with_order=False):
    """Per-image metrics of a list of reconstructions (one per client batch, order matched); `with_order`: also
    each batch's matching (rec.images[order] lines up with its true images)."""
    per_image, orders = {name: [] for name in metrics.NAMES}, []
    for index, rec in enumerate(reconstructions):
        truth = np.asarray(images[index * batch_size : (index + 1) * batch_size])
        order, values = metrics.match_and_score(rec.images, truth, rec.raw_images)
        orders.append(order)
        for name, array in values.items():
            per_image[name] += [float(v) for v in array]
        accuracy = metrics.label_accuracy(rec.labels, labels[index * batch_size : (index + 1) * batch_size])
        per_image["label_accuracy"] += [accuracy] * len(truth)
    return (per_image, orders) if with_order else per_image


def run_threats(
    attack_name,
    victims,
    images,
    labels,
    threats,
    batch_size=1,
    attack_options=None,
    kind="gradient",
    capture_dir=None,
    update_options=None,
    seed=0,
    progress=None,
    server_lock_weights=None,
    log=None,
):
    """Attacks `images` (in client batches) under each threat; returns {threat: result dict}.

    A result dict holds the reconstructions, per-image metrics, their summary, and timing.
    `server_lock_weights`: see `cases.threat_secret`. `log(line)` hears of each threat's stages."""
    results = {}
    for number, threat in enumerate(threats, 1):
        if log:
            log(
                f"[{attack_name}/{threat}] threat {number}/{len(threats)}: simulating the clients, compiling the attack"
            )
        victim = victims["plain" if threat == "none" else "locked"]
        payload, truth = cases.simulate_clients(
            victim,
            images,
            labels,
            batch_size,
            kind,
            capture_dir and os.path.join(capture_dir, threat),
            **(update_options or {}),
        )
        results[threat] = attack_targets(
            attack_name,
            payload,
            threat,
            truth,
            batch_size,
            secret=cases.threat_secret(threat, victim, server_lock_weights),
            attack_options=attack_options,
            seed=seed,
            progress=progress and (lambda done, total, loss, th=threat: progress(th, done, total, loss)),
        )
        if log:
            compiling = results[threat]["seconds"] - results[threat]["reconstructions"][0].info["optimizer_seconds"]
            log(f"[{attack_name}/{threat}] done in {results[threat]['seconds']:.1f} s ({compiling:.1f} s compiling)")
    return results


def run_attack(
    attack_name, payload, threat, secret=None, attack_options=None, seed=0, progress=None, oracle_labels=None
):
    """Attacks a `cases.Payload` (the server's view, one target per client) under one threat (`secret`:
    see `cases.threat_secret`); returns (reconstructions, seconds). It never sees the clients' data
    (`oracle_labels`: an oracle a caller opts into by name, each target's true labels in training order, with
    label_mode='given')."""
    attacker = model_lib.AttackerModel(payload.view, threat, secret=secret, seed=seed + 7)
    attack = build_attack(attack_name, attacker, attack_config(attack_name, attack_options, seed=seed))
    start = time.perf_counter()
    reconstructions = attack.reconstruct(list(payload.targets), labels=oracle_labels, progress=progress)
    return reconstructions, time.perf_counter() - start


def attack_targets(
    attack_name, payload, threat, truth, batch_size=1, secret=None, attack_options=None, seed=0, progress=None
):
    """`run_attack`, then scored against the `cases.UserData` `truth` (one batch of `batch_size` images
    per target); returns the result dict `run_threats` gives per threat."""
    reconstructions, seconds = run_attack(attack_name, payload, threat, secret, attack_options, seed, progress)
    per_image = evaluate(reconstructions, truth.images, truth.labels, batch_size)
    info = reconstructions[0].info
    return {
        "reconstructions": reconstructions,
        "per_image": per_image,
        "success": success(per_image),
        "summary": metrics.summarize(per_image),
        "seconds": seconds,
        "iterations": info["iterations"],
        "evaluations": info["evaluations"],
        "problems": info["problems"],
        "iterations_per_second": info["iterations"] / seconds,
        "problem_evaluations_per_second": info["evaluations"] * info["problems"] / seconds,
        "recovered_labels": [r.labels.tolist() for r in reconstructions],
        "lock_estimates": [r.info.get("lock_estimate") for r in reconstructions] if threat == "adaptive" else None,
    }


def to_uint8(images):
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, -1)
    return (images * 255.0 + 0.5).astype(np.uint8)


def save_grid(path, rows, pad=2):
    """Writes a PNG: one row per (name, images [N, H, W, C]) entry, top to bottom."""
    rows = [to_uint8(images) for _, images in rows]
    count = max(len(r) for r in rows)
    height, width = rows[0].shape[1:3]
    grid = np.full((len(rows) * (height + pad) + pad, count * (width + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = pad + i * (height + pad), pad + j * (width + pad)
            grid[top : top + height, left : left + width] = image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_png(grid))


TABLE_COLUMNS = ("psnr", "ssim", "aligned_psnr", "aligned_ssim", "paper_rmse", "paper_psnr", "label_accuracy")


def success(per_image):
    """{'n', 'recovered', 'rate', 'low', 'high'}: images recovered (aligned SSIM >= 0.6 after the one-to-one
    matching `evaluate` made), with the Wilson 95 % interval."""
    return metrics.success_rate(metrics.recovered(per_image, "ssim"))


def format_success(rate):
    """'3/4 = 75 % [30, 95] %' of a `success` dict."""
    return (
        f"{rate['recovered']}/{rate['n']} = {100 * rate['rate']:.0f} % "
        f"[{100 * rate['low']:.0f}, {100 * rate['high']:.0f}] %"
    )


def format_table(rows):
    """A plain-text table of rows (name, per-image metrics, seconds): first the images recovered (aligned
    SSIM >= 0.6) out of n with the Wilson 95 % interval, then mean +- std per metric."""
    header = (
        f"{'setting':<28}{'recovered (SSIM >= 0.6), 95 % interval':>40}"
        + "".join(f"{c:>17}" for c in TABLE_COLUMNS)
        + f"{'seconds':>9}"
    )
    lines = [header, "-" * len(header)]
    for name, per_image, seconds in rows:
        summary = metrics.summarize(per_image)
        cells = "".join(f"{summary[c]['mean']:>9.3f}+-{summary[c]['std']:<6.3f}" for c in TABLE_COLUMNS)
        lines.append(f"{name:<28}{format_success(success(per_image)):>40}{cells}{seconds:>9.1f}")
    return "\n".join(lines)


def json_ready(results):
    """The JSON part of `run_threats` results (no images)."""
    return {threat: {k: v for k, v in r.items() if k != "reconstructions"} for threat, r in results.items()}


def attack_captures(
    captures,
    out_dir,
    attack="ig",
    attack_options=None,
    truth_images=None,
    truth_labels=None,
    locked_threats=("fixed-key", "adaptive"),
    seed=0,
    verbose=True,
):
    """Attacks captured updates as a curious server: the demo's entry point.

    Args:
      captures: {name: capture file} (e.g. {'fedavg': ..., 'fedkl': ...}). A capture without the
        lock is attacked under threat 'none'; one with the lock under each of `locked_threats`
        ('oracle' and 'adaptive-key' are impossible from a capture: the server holds no lock weights).
      out_dir: gets `captures_grid.png` (truth on top if given, then one row per setting),
        `captures_metrics.json` and `captures_table.txt` (with the truth: images recovered first).
      attack, attack_options: see `build_attack`.
      truth_images, truth_labels: the client's data, to score the reconstructions (optional).
    Returns {setting: {'labels', 'loss', 'seconds', ...; with the truth also 'per_image', 'success' (aligned
    SSIM >= 0.6, Hungarian-matched, Wilson interval) and 'summary'}}.
    """
    if {"oracle", "adaptive-key"} & set(locked_threats):
        raise ValueError("a capture holds no secret: 'oracle' and 'adaptive-key' cannot attack it")
    truth = None if truth_images is None else (np.asarray(truth_images), np.asarray(truth_labels))
    results, grid_images = {}, {}
    for name, path in captures.items():
        capture = capture_lib.load_capture(path)
        payload = cases.Payload.from_capture(capture)
        for threat in locked_threats if capture.meta["lock"] else ("none",):
            setting = f"{name}/{threat}"
            results[setting], grid_images[setting] = _attack_capture(
                setting, payload, threat, attack, attack_options, truth, seed, verbose
            )
    _write_capture_results(out_dir, results, grid_images, truth, verbose)
    return results


def _attack_capture(setting, payload, threat, attack, attack_options, truth, seed, verbose):
    """(result entry, images in the truth's order if given) of one capture under one threat."""
    (target,) = payload.targets
    if verbose:
        print(f"{setting}: compiling the attack", flush=True)

    def progress(done, total, loss):
        print(f"{setting}: {done}/{total} loss {np.min(loss):.4g}", flush=True)

    (rec,), seconds = run_attack(
        attack, payload, threat, attack_options=attack_options, seed=seed, progress=progress if verbose else None
    )
    entry = {
        "labels": rec.labels.tolist(),
        "loss": rec.loss,
        "seconds": seconds,
        "num_examples": target.num_examples,
        "num_steps": target.num_steps,
    }
    if truth is None:
        return entry, rec.images
    per_image = evaluate([rec], *truth, target.num_examples)
    order = metrics.match_order(rec.images, truth[0]) if len(rec.images) > 1 else [0]
    entry.update(per_image=per_image, success=success(per_image), summary=metrics.summarize(per_image))
    return entry, rec.images[order]


def _write_capture_results(out_dir, results, grid_images, truth, verbose):
    """Writes captures_grid.png, captures_metrics.json and, with the truth, captures_table.txt."""
    os.makedirs(out_dir, exist_ok=True)
    grid_path = os.path.join(out_dir, "captures_grid.png")
    if truth is None:
        save_grid(grid_path, list(grid_images.items()))
    else:
        rows = [(setting, images, results[setting]["per_image"]) for setting, images in grid_images.items()]
        grids.save_labelled_grid(grid_path, truth[0], rows, truth_labels=truth[1])
    with open(os.path.join(out_dir, "captures_metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    if truth is None:
        return
    table = format_table([(setting, r["per_image"], r["seconds"]) for setting, r in results.items()])
    with open(os.path.join(out_dir, "captures_table.txt"), "w") as f:
        f.write(table + "\n")
    if verbose:
        print(table)
