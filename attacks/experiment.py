"""Running attacks as experiments: victims, targets, threat models side by side, metrics, PNG grids.

`run_threats` attacks the same images under several threat models: 'none' against the backbone
without the lock, the others against the identical backbone with it. `attack_captures` is the demo's
entry point: attack captured updates (with and without the lock) and write a grid and a table.
"""

import json
import os
import time

import numpy as np
import tensorflow as tf

from attacks import dlg, grnn, ig, metrics
from attacks import model as model_lib
from attacks import targets as targets_lib
from tfkl import capture as capture_lib
from tfkl import keys as keys_lib
from tfkl import models, private

ATTACKS = {"dlg": dlg.DLG, "idlg": dlg.IDLG, "ig": ig.InvertingGradients, "grnn": grnn.GRNN}
TARGET_KINDS = ("gradient", "update")


def build_attack(name, attacker, **options):
    """An attack by name ('dlg', 'idlg', 'ig', 'grnn') on `attacker` with its hyperparameters."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {tuple(ATTACKS)}")
    return ATTACKS[name](attacker, **options)


def build_victims(model_name, input_shape, num_classes, init="pytorch", seed=0, normalization="batch",
                  key_seed=1, threats=model_lib.THREATS):
    """{'plain': backbone, 'locked': the same backbone with the lock} (only those `threats` need)."""
    victims = {}
    if "none" in threats:
        victims["plain"] = models.build(model_name, input_shape, num_classes, lock=False, init=init, seed=seed)
    if any(t != "none" for t in threats):
        victims["locked"] = models.build(model_name, input_shape, num_classes, lock=True, init=init, seed=seed,
                                         normalization=normalization, key=keys_lib.generate_key(1024, seed=key_seed))
    return victims


def privatize_lock(victim, seed):
    """Replaces the victim's lock weights by privately drawn ones (a client with lock_init='private');
    returns the ones it had, model_fn's, which are all a server knows of them."""
    server_known = model_lib.extract_lock_weights(victim)
    lock_variables = [v for lock in private.lock_layers(victim) for v in lock.private_weights[1:]]
    for variable, value in zip(lock_variables, private.draw_lock_weights(victim, seed=[seed])):
        variable.assign(value)
    return server_known


def make_targets(victim, images, labels, per_client, kind="gradient", capture_dir=None, **update_options):
    """Client targets from consecutive groups of `per_client` images: single-step gradients (one
    batch), or updates of locally simulated client steps written as capture files under `capture_dir`
    (`update_options`: see `targets.client_update_capture`)."""
    result = []
    for index, start in enumerate(range(0, len(images), per_client)):
        x, y = images[start:start + per_client], labels[start:start + per_client]
        if kind == "gradient":
            result.append(targets_lib.client_gradient(victim, x, y))
        else:
            path = os.path.join(capture_dir, f"client_{index:03d}.npz")
            capture = targets_lib.client_update_capture(victim, x, y, path, **update_options)
            result.append(targets_lib.from_capture(capture))
    return result


def evaluate(reconstructions, images, labels, batch_size):
    """Per-image metrics of a list of reconstructions (one per client batch, order matched)."""
    per_image = {name: [] for name in metrics.NAMES}
    for index, rec in enumerate(reconstructions):
        truth = np.asarray(images[index * batch_size:(index + 1) * batch_size])
        order = metrics.match_order(rec.images, truth) if len(truth) > 1 else np.arange(1)
        values = metrics.image_metrics(rec.images[order], truth, rec.raw_images[order])
        for name, array in values.items():
            per_image[name] += [float(v) for v in array]
        accuracy = metrics.label_accuracy(rec.labels, labels[index * batch_size:(index + 1) * batch_size])
        per_image["label_accuracy"] += [accuracy] * len(truth)
    return per_image


def run_threats(attack_name, victims, images, labels, threats, batch_size=1, attack_options=None,
                kind="gradient", capture_dir=None, update_options=None, seed=0, progress=None,
                server_lock_weights=None):
    """Attacks `images` (in client batches) under each threat; returns {threat: result dict}.

    A result dict holds the reconstructions, per-image metrics, their summary, and timing.
    `server_lock_weights`: see `threat_secret`."""
    results = {}
    for threat in threats:
        victim = victims["plain" if threat == "none" else "locked"]
        client_targets = make_targets(victim, images, labels, batch_size, kind,
                                      capture_dir and os.path.join(capture_dir, threat), **(update_options or {}))
        results[threat] = attack_targets(
            attack_name, model_lib.ServerView.from_model(victim), threat, client_targets, images, labels, batch_size,
            secret=threat_secret(threat, victim, server_lock_weights), attack_options=attack_options,
            seed=seed, progress=progress and (lambda d, t, l, th=threat: progress(th, d, t, l)))
    return results


def threat_secret(threat, victim, server_lock_weights=None):
    """What an attacker under `threat` knows of the victim's secret: key and lock weights ('oracle'),
    the lock weights a server knows ('adaptive-key': the victim's own when clients start from
    model_fn's lock, else `server_lock_weights`, model_fn's), nothing otherwise."""
    if threat == "adaptive-key" and server_lock_weights is not None:
        return server_lock_weights
    extract = {"oracle": model_lib.extract_secret, "adaptive-key": model_lib.extract_lock_weights}.get(threat)
    return extract(victim) if extract else None


def attack_targets(attack_name, view, threat, client_targets, images, labels, batch_size=1, secret=None,
                   attack_options=None, seed=0, progress=None):
    """Attacks given client targets (one per batch of `batch_size` images) from `view` under one
    threat (`secret`: see `threat_secret`); returns the result dict `run_threats` gives per threat."""
    attacker = model_lib.AttackerModel(view, threat, secret=secret, seed=seed + 7)
    attack = build_attack(attack_name, attacker, seed=seed, **(attack_options or {}))
    start = time.perf_counter()
    reconstructions = attack.reconstruct(client_targets, progress=progress)
    seconds = time.perf_counter() - start
    per_image = evaluate(reconstructions, images, labels, batch_size)
    info = reconstructions[0].info
    return {
        "reconstructions": reconstructions, "per_image": per_image, "summary": metrics.summarize(per_image),
        "seconds": seconds, "iterations": info["iterations"], "evaluations": info["evaluations"],
        "problems": info["problems"], "iterations_per_second": info["iterations"] / seconds,
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
            grid[top:top + height, left:left + width] = image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_png(grid))


TABLE_COLUMNS = ("psnr", "ssim", "aligned_psnr", "aligned_ssim", "paper_rmse", "paper_psnr", "label_accuracy")


def format_table(rows):
    """A plain-text table: rows of (name, summary, seconds) with mean +- std per metric."""
    header = f"{'setting':<28}" + "".join(f"{c:>17}" for c in TABLE_COLUMNS) + f"{'seconds':>9}"
    lines = [header, "-" * len(header)]
    for name, summary, seconds in rows:
        cells = "".join(f"{summary[c]['mean']:>9.3f}+-{summary[c]['std']:<6.3f}" for c in TABLE_COLUMNS)
        lines.append(f"{name:<28}{cells}{seconds:>9.1f}")
    return "\n".join(lines)


def json_ready(results):
    """The JSON part of `run_threats` results (no images)."""
    return {threat: {k: v for k, v in r.items() if k != "reconstructions"} for threat, r in results.items()}


def attack_captures(captures, out_dir, attack="ig", attack_options=None, truth_images=None, truth_labels=None,
                    locked_threats=("fixed-key", "adaptive"), seed=0, verbose=True):
    """Attacks captured updates as a curious server: the demo's entry point.

    Args:
      captures: {name: capture file} (e.g. {'fedavg': ..., 'fedkl': ...}). A capture without the
        lock is attacked under threat 'none'; one with the lock under each of `locked_threats`
        ('oracle' and 'adaptive-key' are impossible from a capture: the server holds no lock weights).
      out_dir: gets `captures_grid.png` (truth on top if given, then one row per setting),
        `captures_metrics.json` and `captures_table.txt`.
      attack, attack_options: see `build_attack`.
      truth_images, truth_labels: the client's data, to score the reconstructions (optional).
    Returns {setting: {'labels', 'loss', 'seconds', and per-image metrics if the truth is given}}.
    """
    if {"oracle", "adaptive-key"} & set(locked_threats):
        raise ValueError("a capture holds no secret: 'oracle' and 'adaptive-key' cannot attack it")
    results, grid_rows, table_rows = {}, [], []
    if truth_images is not None:
        grid_rows.append(("truth", np.asarray(truth_images)))
    for name, path in captures.items():
        capture = capture_lib.load_capture(path)
        view = model_lib.ServerView.from_capture(capture)
        target = targets_lib.from_capture(capture)
        for threat in (locked_threats if capture.meta["lock"] else ("none",)):
            attacker = model_lib.AttackerModel(view, threat, seed=seed + 7)
            runner = build_attack(attack, attacker, seed=seed, **(attack_options or {}))
            start = time.perf_counter()
            rec = runner.reconstruct(target, progress=(lambda d, t, l, s=f"{name}/{threat}": print(
                f"{s}: {d}/{t} loss {np.min(l):.4g}", flush=True)) if verbose else None)
            setting = f"{name}/{threat}"
            entry = {"labels": rec.labels.tolist(), "loss": rec.loss, "seconds": time.perf_counter() - start,
                     "num_examples": target.num_examples, "num_steps": target.num_steps}
            images = rec.images
            if truth_images is not None:
                per_image = evaluate([rec], np.asarray(truth_images), np.asarray(truth_labels), target.num_examples)
                order = metrics.match_order(rec.images, np.asarray(truth_images)) if len(images) > 1 else [0]
                images = rec.images[order]
                entry.update(per_image=per_image, summary=metrics.summarize(per_image))
                table_rows.append((setting, entry["summary"], entry["seconds"]))
            grid_rows.append((setting, images))
            results[setting] = entry
    os.makedirs(out_dir, exist_ok=True)
    save_grid(os.path.join(out_dir, "captures_grid.png"), grid_rows)
    with open(os.path.join(out_dir, "captures_metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    if table_rows:
        table = format_table(table_rows)
        with open(os.path.join(out_dir, "captures_table.txt"), "w") as f:
            f.write(table + "\n")
        if verbose:
            print(table)
    return results
