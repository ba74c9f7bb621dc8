"""The candidates' table and privacy-accuracy frontier, from the cached runs and records: per configuration the
strongest attack's success in each regime, own-key and random-key accuracy against the control, ResNet-20, the
train step; the ship targets checked."""

import numpy as np

from experiments import common
from experiments.studies import adaptive_attacker, key_table
from experiments.studies.candidates import (
    ATTACKS,
    CANDIDATES,
    CHANCE,
    EXTRA_THREATS,
    NONE_SUCCEEDS,
    NUM_IMAGES,
    REFERENCES,
    RESNET,
    SPATIAL_EXTRA_THREATS,
    TARGET_ACCURACY_PP,
    TARGET_RANDOM_KEY_PP,
    TARGET_SUCCESS,
    TARGET_UPPER,
    UPDATE,
    UPDATE_ATTACKS,
    UPDATE_TRAINING,
    attack_names,
    cached_images,
    candidate_of,
    holding,
    num_images,
    update_names,
)


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _pct(value, signed=False):
    return "n/a" if value is None else (f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}")


def tabulate(names, seeds, run_dir, training, overhead):
    """The payload of results/candidates.json from what the parts produced (missing parts show n/a): the attack
    cells' records (`attack_scores`), the training runs' rows and the overhead, per configuration a summary
    (`configuration_summary`) and a table row (`table_row`)."""
    success, extra = attack_scores(names, seeds, run_dir)
    held = holding(names, seeds, run_dir)
    lenet, resnet = training["lenet"], training["resnet"]
    control = _mean([r["own"] for r in lenet.get("control", {}).values()])
    resnet_control = _mean([r["own"] for r in resnet.get("control", {}).values()])
    sizes = key_table.SETTING["public_sizes"]
    rows, key_rows, summary = [], [], {}
    for name in ["control", *attack_names(names)]:
        runs = list(lenet.get(name, {}).values())
        figures = None
        if runs:
            key_row, figures = key_table.table_row(candidate_of(name).label, runs, sizes, CHANCE)
            key_rows.append(key_row)
        summary[name] = configuration_summary(name, seeds, training, success, extra.get(name, {}), figures, overhead)
        rows.append(table_row(name, summary[name], lenet, held, resnet_control))
    partial = overhead is None or any(
        summary[name]["meets_target"] is None or summary[name]["resnet_own"] is None for name in names
    )
    title = "Key-lock candidates: adaptive attack success (aligned SSIM >= 0.6) and accuracy"
    if partial:
        title += " (PARTIAL: 'n/a' and 'incomplete' cells wait for `python -m experiments.studies.candidates`)"
    return {
        "settings": _settings(names, seeds),
        "results": dict(
            partial=partial,
            by_configuration=summary,
            control=control,
            resnet_control=resnet_control,
            best_trade_off=_best_trade_off(summary, names),
        ),
        "tables": [
            {"title": title, "columns": _columns(seeds), "rows": rows},
            {
                "title": "The key table of each candidate (LeNet Fashion-MNIST, mean ± std over the seeds, %)",
                "columns": key_table.table_columns(sizes),
                "rows": key_rows,
            },
        ],
        "headline": headline(summary, names),
        "notes": _notes(),
    }


def attack_scores(names, seeds, run_dir):
    """({name: {attack: score over the seeds, with 'complete'}}, {name: {threat: {attack: score at the first
    seed}}}) of every attacked configuration's records."""
    success, extra = {}, {}
    for name in attack_names(names):
        for attack in (*ATTACKS, *UPDATE_ATTACKS):
            stored = [cached_images(run_dir, name, attack, s) for s in seeds]
            entries = [e for images in stored for e in images.values()]
            complete = all(len(images) == num_images(attack) for images in stored)
            if entries:
                success.setdefault(name, {})[attack] = dict(adaptive_attacker.score(entries), complete=complete)
            for threat in EXTRA_THREATS + SPATIAL_EXTRA_THREATS if attack in ATTACKS else ():
                threat_entries = list(cached_images(run_dir, name, attack, seeds[0], threat).values())
                if threat_entries:
                    extra.setdefault(name, {}).setdefault(threat, {})[attack] = adaptive_attacker.score(threat_entries)
    return success, extra


def configuration_summary(name, seeds, training, success, extra, key_figures, overhead):
    """results.by_configuration[name]: attack success, accuracy against the control (paired by seed), the key
    table's figures (`key_figures`, None without runs), the overhead and the ship target's checks."""
    candidate, lenet, resnet = candidate_of(name), training["lenet"], training["resnet"]
    control_runs = lenet.get("control", {})
    runs = list(lenet.get(name, {}).values())
    # Paired with the control's run of the same seed: seeds differ more than configurations do.
    paired = [r["own"] - control_runs[s]["own"] for s, r in lenet.get(name, {}).items() if s in control_runs]
    minus_control = _mean(paired)
    all_seeds = len(runs) == len(seeds)
    random_key, gain = (key_figures["random_key"], key_figures["gain"]) if key_figures else (None, None)
    resnet_own = _mean([r["own"] for r in resnet.get(name, {}).values()])
    resnet_control = _mean([r["own"] for r in resnet.get("control", {}).values()])
    by_attack = success.get(name, {})
    checks = dict(
        privacy=privacy_check(by_attack, success.get("none", {})),
        accuracy=None if minus_control is None or not all_seeds else -100 * minus_control <= TARGET_ACCURACY_PP,
        random_key=None if random_key is None or not all_seeds else 100 * (random_key - CHANCE) <= TARGET_RANDOM_KEY_PP,
    )
    return dict(
        label=candidate.label,
        flags=list(candidate.train_flags),
        success=by_attack,
        first_seed_threats=extra,
        lenet_own=_mean([r["own"] for r in runs]),
        lenet_minus_control=minus_control,
        lenet_seeds=len(runs),
        random_key=random_key,
        recovery_minus_scratch_100=gain,
        resnet_own=resnet_own,
        resnet_minus_control=None if resnet_own is None or resnet_control is None else resnet_own - resnet_control,
        step_time_ratio=(overhead or {}).get("ratio_to_control", {}).get(name),
        round_seconds=_mean([r.get("round_seconds") for r in runs]),
        checks=checks,
        meets_target=False if False in checks.values() else (None if None in checks.values() else True),
    )


def _attack_cell(name, attack, by_attack, held):
    if attack in UPDATE_ATTACKS and name in CANDIDATES and name not in update_names(attack, [name], held):
        return "–"
    if attack not in by_attack:
        return "n/a"
    score = by_attack[attack]
    return (
        f"{score['ssim']['recovered']}/{score['n']} = "
        f"{100 * score['ssim']['rate']:.0f} % [{100 * score['ssim']['low']:.0f}, "
        f"{100 * score['ssim']['high']:.0f}]" + ("" if score["complete"] else " (partial)")
    )


def table_row(name, entry, lenet, held, resnet_control):
    """The candidates table's row of configuration `name` from its summary `entry`."""
    attack_cells = [_attack_cell(name, attack, entry["success"], held) for attack in (*ATTACKS, *UPDATE_ATTACKS)]
    extra_cells = [
        ", ".join(
            f"{a.upper()} {e['ssim']['recovered']}/{e['n']}" for a, e in entry["first_seed_threats"].get(t, {}).items()
        )
        or "–"
        for t in EXTRA_THREATS + SPATIAL_EXTRA_THREATS
    ]
    own, runs = entry["lenet_own"], list(lenet.get(name, {}).values())
    own_cell = "n/a"
    if own is not None:
        spread = f" ± {100 * np.std([r['own'] for r in runs]):.1f}" if len(runs) > 1 else ""
        own_cell = f"{100 * own:.1f}{spread} (seeds {', '.join(str(s) for s in sorted(lenet[name]))})"
    resnet_own = entry["resnet_own"]
    resnet_cell = _pct(resnet_own)
    if resnet_own is not None and name != "control" and resnet_control is not None:
        resnet_cell += f" ({100 * (resnet_own - resnet_control):+.1f})"
    ratio = entry["step_time_ratio"]
    verdict = {None: "incomplete", True: "MEETS", False: "no"}[entry["meets_target"]]
    return [candidate_of(name).label, *attack_cells, *extra_cells] + [
        own_cell,
        _pct(entry["lenet_minus_control"], True),
        _pct(entry["random_key"]),
        _pct(entry["recovery_minus_scratch_100"], True),
        resnet_cell,
        "n/a" if ratio is None else f"{ratio:.2f}x",
        "–" if name in REFERENCES or name == "control" else verdict,
    ]


def _columns(seeds):
    return [
        "configuration",
        *[f"{a.upper()} adaptive: recovered, n, [95 % CI]" for a in ATTACKS],
        *[
            f"{a.split('-')[0].upper()} adaptive, U8, step labels known (oracle): recovered, n, [95 % CI]"
            for a in UPDATE_ATTACKS
        ],
        f"oracle, seed {seeds[0]} (does the attack work?)",
        f"adaptive-key, seed {seeds[0]} (model_fn's lock known)",
        f"adaptive, 'joint' starts, seed {seeds[0]} (spatial locks)",
        f"adaptive, images and lock in turns, seed {seeds[0]} (spatial locks)",
        "LeNet FMNIST own key (%)",
        "- control, same seeds (pp)",
        "random key + own lock (%)",
        "recovery - scratch, 100 (pp)",
        "ResNet-20 digits own key (%) (- control, pp)",
        "train step / control",
        "ship target",
    ]


def _settings(names, seeds):
    return dict(
        attacks={a: adaptive_attacker.BASE_OPTIONS[a] for a in ATTACKS},
        attack_images=f"Fashion-MNIST training images 0-{NUM_IMAGES - 1}, batch 1, untrained LeNet",
        update_attacks=dict(
            options=UPDATE_ATTACKS,
            client_training=UPDATE_TRAINING,
            images=f"Fashion-MNIST training images 0-{num_images(next(iter(UPDATE_ATTACKS))) - 1}",
            **UPDATE,
        ),
        seeds=[int(s) for s in seeds],
        lenet=dict(
            key_table.SETTING, public_sizes=list(key_table.SETTING["public_sizes"]), clients=key_table.NUM_CLIENTS
        ),
        resnet=RESNET,
        candidates={n: list(candidate_of(n).train_flags) for n in ["control", *attack_names(names)]},
        targets=dict(
            adaptive_success=TARGET_SUCCESS,
            wilson_upper=TARGET_UPPER,
            accuracy_pp=TARGET_ACCURACY_PP,
            random_key_pp_over_chance=TARGET_RANDOM_KEY_PP,
        ),
    )


def _notes():
    return [
        "Attacks: batch-1 single-step gradients of the untrained LeNet (PyTorch init; seeds set the victim's "
        "weights, its key is seed + 1's), the same 10 images for every seed, so n = 10 images x seeds counts "
        "attacks. 'adaptive': gamma/beta unknown and optimised with the image, each attack's strongest strategy "
        "(attacks.base: 'relearn'); restarts are chosen by the attack's own loss. The references are attacked "
        "under 'none' (no lock). Pruned targets are matched on their kept entries only.",
        f"U8 updates: each client trains one local epoch over {UPDATE['images_per_client']} images in steps of "
        f"{UPDATE_TRAINING['batch_size']} (SGD lr {UPDATE_TRAINING['learning_rate']}, "
        f"experiments.studies.regimes' U8) on the same victims, {UPDATE['clients']} clients per seed; the attack "
        "simulates the steps and is given each step's labels (an oracle on the order; these cells came before the "
        "step search with which experiments.studies.regimes' U8 attacks find the labels themselves); "
        "reconstructions are Hungarian-matched to the client's images. IG attacks every configuration, GRNN the "
        "references and the candidates that hold at batch 1 ('–': not run). The ship target applies to a regime "
        "(batch 1, U8) only where the "
        f"unprotected client leaks at least {100 * NONE_SUCCEEDS:.0f} % to some attack, and then to every attack.",
        "Accuracy: mean over the LeNet seeds of each client's own key and lock (entry a of "
        "tff_programs.evaluate); the control is `--algorithm=fedavg-norm` (the lock blocks replaced by a learned "
        f"affine, no key). ResNet-20 digits: {RESNET['rounds']} rounds, seed {RESNET['seed']}, local statistics "
        "for FedKL, averaged for the control, the whole test split.",
        "Train step / control: median seconds per LeNet train step (batch 64) over the control's, measured in "
        "turns in one process (experiments.studies.candidates' overhead part); the spatial lock's kernels are "
        "1024 x 3072 each.",
        "Key table: tff_programs.evaluate's entries as in results/key_table.md (the paper's, gaussian and "
        "control rows are that table's runs).",
        "A configuration ships only if it meets every target; the privacy target is checked per attack. The best "
        "trade-off (results.best_trade_off) is the candidate with the lowest worst-attack success among those "
        "within 1 pp of the control, else the lowest overall.",
        common.SHARED_MACHINE_NOTE,
    ]


def privacy_check(by_attack, reference):
    """Whether a candidate meets the privacy target under every attack of every regime (batch 1, U8) where the
    unprotected client (`reference`'s cells) leaks at least NONE_SUCCEEDS to some attack; None while a cell
    this needs is incomplete."""
    verdicts = []
    for attacks in (ATTACKS, tuple(UPDATE_ATTACKS)):
        leaks = [reference.get(a) for a in attacks]
        known = [leak for leak in leaks if leak and leak["complete"]]
        if not any(leak["ssim"]["rate"] >= NONE_SUCCEEDS for leak in known):
            verdicts += [] if len(known) == len(attacks) else [None]  # the regime does not count (or is not known yet)
            continue
        for attack in attacks:
            cell = by_attack.get(attack)
            verdicts.append(
                None
                if not (cell and cell["complete"])
                else cell["ssim"]["rate"] <= TARGET_SUCCESS and cell["ssim"]["high"] <= TARGET_UPPER
            )
    return False if False in verdicts else (None if None in verdicts else True)


def headline(summary, names):
    """Per candidate: the stronger attack's adaptive success and the accuracy against the control, with the targets."""
    lines = []
    for name in names:
        entry = summary[name]
        if entry["success"]:
            attack, worst = max(entry["success"].items(), key=lambda item: item[1]["ssim"]["rate"])
            lines.append(
                dict(
                    metric=f"{name}: recovered under adaptive by the stronger attack ({attack}), n = {worst['n']}",
                    value=round(100 * worst["ssim"]["rate"], 1),
                    unit="%",
                    target=f"<= {100 * TARGET_SUCCESS:.0f} %, Wilson upper <= {100 * TARGET_UPPER:.0f} %",
                    met=entry["checks"]["privacy"],
                )
            )
        if entry["lenet_minus_control"] is not None:
            lines.append(
                dict(
                    metric=f"{name}: LeNet accuracy minus the FedAvg control (seeds: {entry['lenet_seeds']})",
                    value=round(100 * entry["lenet_minus_control"], 1),
                    unit="pp",
                    target=f">= -{TARGET_ACCURACY_PP:g} pp",
                    met=entry["checks"]["accuracy"],
                )
            )
    return lines


def _best_trade_off(summary, names):
    """The candidate with the lowest worst-attack adaptive success among those within 1 pp of the control
    (else among all measured); None when no candidate has both figures."""

    def worst(name):
        rates = [e["ssim"]["rate"] for e in summary[name]["success"].values()]
        return max(rates) if rates else None

    measured = [n for n in names if worst(n) is not None and summary[n]["lenet_minus_control"] is not None]
    close = [n for n in measured if -100 * summary[n]["lenet_minus_control"] <= TARGET_ACCURACY_PP]
    pool = close or measured
    return min(pool, key=lambda n: (worst(n), -summary[n]["lenet_minus_control"])) if pool else None


def frontier_figure(payload, path, x_min=-8.0):
    """The privacy-accuracy frontier: each candidate's worst-attack adaptive success over the batch-1 and U8
    cells (Wilson interval) against its LeNet accuracy minus the control's (candidates below `x_min` pp drawn
    at the edge, their value in the label); the references' success as lines; the ship region shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = payload["results"]["by_configuration"]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.add_patch(
        plt.Rectangle((-TARGET_ACCURACY_PP, 0), TARGET_ACCURACY_PP + 1, 100 * TARGET_SUCCESS, color="green", alpha=0.15)
    )
    ax.text(0.05, 100 * TARGET_SUCCESS + 1, "ship targets", fontsize=7, color="green")
    stacked = {}  # points at the same place get their labels one above the other
    references = {}  # rate -> the references' labels, drawn as one line each
    for name, entry in summary.items():
        if not entry["success"]:
            continue
        worst_attack, worst = max(entry["success"].items(), key=lambda item: item[1]["ssim"]["rate"])
        rate = 100 * worst["ssim"]["rate"]
        if name in REFERENCES:
            references.setdefault(round(rate), []).append(entry["label"])
            continue
        if entry["lenet_minus_control"] is None:
            continue
        x = 100 * entry["lenet_minus_control"]
        shown = max(x, x_min)
        low, high = 100 * worst["ssim"]["low"], 100 * worst["ssim"]["high"]
        ax.errorbar(
            shown,
            rate,
            yerr=[[max(0.0, rate - low)], [max(0.0, high - rate)]],
            fmt="<" if x < x_min else "o",
            capsize=3,
        )
        slot = stacked.setdefault((round(2 * shown), round(rate / 10)), [])
        label = f"{name} ({worst_attack.upper()})" + (f", {x:+.0f} pp" if x < x_min else "")
        ax.annotate(label, (shown, rate), textcoords="offset points", xytext=(6, 4 + 10 * len(slot)), fontsize=7)
        slot.append(name)
    for rate, labels in references.items():
        ax.axhline(rate, color="grey", linestyle=":", linewidth=1)
        ax.text(x_min + 0.1, rate - 4, f"{' / '.join(labels)}: {rate} %", fontsize=7, color="grey")
    ax.set_xlim(x_min - 0.3, 1.0)
    ax.set_ylim(-3, 118)
    ax.set_xlabel("LeNet Fashion-MNIST accuracy minus the FedAvg control (pp, paired by seed, mean)")
    ax.set_ylabel("recovered by the strongest attack, adaptive (%)")
    ax.set_title(
        "Key-lock candidates: privacy (batch 1 and U8 with step labels known) against accuracy; Wilson 95 %",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
