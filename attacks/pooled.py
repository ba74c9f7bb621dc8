"""A server that watches one client over rounds: several captures of that client attacked together.

The client's secret (its key and lock) persists between rounds, moving only as its local training moves it,
while its images are new unknowns in every capture. `pool_captures` checks that the captures are one client's
on one model and makes a `targets.Pooled` of them; any optimisation attack then searches each capture's images
and one shared set of lock unknowns (`base.Attack` with a pooled target). `attack_pool` tries drift strengths
(a per-capture offset of the lock unknowns under a penalty) and keeps the one whose reconstruction explains
the entries it left out of the fit best: the attack's own loss decides, never the truth.
"""

import dataclasses

import numpy as np

from attacks import model as model_lib
from attacks import targets as targets_lib
from tfkl import capture as capture_lib

PER_CAPTURE_META = ("format", "round", "client_id")  # the rest of a capture's meta is the same for one client
MATCHING_META = tuple(key for key in capture_lib.REQUIRED_META if key not in PER_CAPTURE_META)
DEFAULT_HOLDOUT = 0.1  # the share of each capture's entries `attack_pool` leaves out to compare drift strengths


class PoolError(ValueError):
    """Captures that are not one client's on one model (one line, naming the capture that differs)."""


def check_pool(metas, names=None):
    """Raises PoolError unless every meta is of the first one's client, model and client hyperparameters."""
    names = names or [f"capture {i}" for i in range(len(metas))]
    if not metas:
        raise PoolError("a pool needs at least one capture")
    first = metas[0]
    for name, meta in zip(names[1:], metas[1:]):
        if str(meta["client_id"]) != str(first["client_id"]):
            raise PoolError(
                f"{name} is of client {meta['client_id']}, {names[0]} of client {first['client_id']}: "
                "a pool holds one client's captures"
            )
        differing = [key for key in MATCHING_META if meta[key] != first[key]]
        if differing:
            raise PoolError(
                f"{name} differs from {names[0]} in {', '.join(differing)}: a pool holds one model's captures"
            )


def pool_captures(captures, names=None, lock_weights=None, drift=0.0, holdout=0.0, seed=0):
    """(the server's view, a `targets.Pooled`) of `captures` (`tfkl.capture.Capture`s of one client, in round
    order); `lock_weights`, `drift`, `holdout`, `seed`: see `targets.Pooled`. The view is the first capture's."""
    check_pool([capture.meta for capture in captures], names)
    members = tuple(targets_lib.from_capture(capture) for capture in captures)
    weights = tuple(tuple(capture.global_weights) for capture in captures)
    pooled = targets_lib.Pooled(members, weights, lock_weights, float(drift), float(holdout), seed)
    return model_lib.ServerView.from_capture(captures[0]), pooled


def label_orders(attacker, pooled):
    """`pooled` as a client that trains the same images every round (`targets.Pooled.orders`), each member's
    order read from the labels: the shared set is the first member's images in its training order, and each
    member's local steps are matched to it by their labels (`labels.label_hypotheses`' most plausible, on the
    member's round), equal labels in turn. It reads the captures only; where a member's labels differ from the
    first's, the positions left over are matched as well as labels allow."""
    from scipy.optimize import linear_sum_assignment

    from attacks import labels as labels_lib

    per_member = [hypotheses[0] for hypotheses in labels_lib.member_hypotheses(attacker, pooled, 1)]
    first = per_member[0]
    positions = np.arange(len(first))
    in_turn = 1e-3 * np.abs(positions[:, None] - positions[None, :]) / len(first)  # equal labels in turn
    orders = []
    for labels in per_member:
        _, shared = linear_sum_assignment((labels[:, None] != first[None, :]) + in_turn)
        orders.append(tuple(int(i) for i in shared))
    return dataclasses.replace(pooled, orders=tuple(orders))


def attack_pool(attack, pooled, drifts=(0.0,), holdout=DEFAULT_HOLDOUT, labels=None, progress=None):
    """Reconstructs `pooled` with `attack` (a `base.Attack` on the pool's view) at each drift strength and keeps
    the reconstruction with the lowest held-out loss (`Pooled.holdout`); with one strength, no entry is left
    out. Returns (the reconstruction kept, {drift: held-out loss}), its info naming the drift chosen."""
    if len(drifts) == 1:
        return attack.reconstruct(dataclasses.replace(pooled, drift=float(drifts[0])), labels, progress), {}
    tried = {}
    for drift in drifts:
        trial = dataclasses.replace(pooled, drift=float(drift), holdout=holdout)
        tried[float(drift)] = attack.reconstruct(trial, labels, progress)
    scores = {drift: rec.info["held_out_loss"] for drift, rec in tried.items()}
    chosen = min(scores, key=scores.get)
    return tried[chosen], scores


def score(reconstruction, truths):
    """(per-image metrics, order) of a pooled reconstruction against each capture's true data (`cases.UserData`,
    in pool order): each capture's images matched one-to-one with its own truth (`experiment.evaluate`);
    reconstruction.images[order] lines up with the captures' true images, concatenated."""
    from attacks import experiment

    n = len(truths[0].images)
    parts = [
        dataclasses.replace(
            reconstruction,
            images=reconstruction.images[k * n : (k + 1) * n],
            raw_images=reconstruction.raw_images[k * n : (k + 1) * n],
            labels=reconstruction.labels[k * n : (k + 1) * n],
        )
        for k in range(len(truths))
    ]
    images = np.concatenate([truth.images for truth in truths])
    labels = np.concatenate([truth.labels for truth in truths])
    per_image, orders = experiment.evaluate(parts, images, labels, n, with_order=True)
    return per_image, np.concatenate([k * n + order for k, order in enumerate(orders)])
