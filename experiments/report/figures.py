"""The report's figures, drawn from results/*.json (`make report` runs it first).

  python -m experiments.report.figures [--results_dir=results]     # -> docs/figures/*.png, next to docs/REPORT.md

- accuracy_curves.png: test accuracy per epoch (central) and per round (FedAvg, FedKL) of table1.json;
- privacy_utility.png: accuracy against the strongest attack's SSIM and aligned PSNR per defence
  (privacy_utility.json);
- candidates_frontier.png: each key-lock candidate's adaptive attack success against its accuracy minus the
  FedAvg control's (candidates.json);
- privacy_over_rounds.png: attack success against the round of a real run's global model, FedAvg vs
  FedKL (regimes.json, the T regimes);
- grid_regime_<regime>.png: seed 0's labelled grid of each realistic regime (runs/regimes/<regime>/);
- grid_rounds_<regime>-<row>_<attack>.png: seed 0's labelled grid of each regime M row's largest pool
  (runs/rounds/<regime>-<row>/seed0/);
- grid_<experiment>.png: reconstruction grids (truth, then one row per threat) of the attack
  experiments whose runs are on this machine (runs/attack_quality/<experiment>/grid.png), seed 0 and
  the seeds in SEED_GRIDS.
A figure whose results are missing is skipped with a note; nothing is drawn from typed-in numbers.
"""

import os
import shutil

from absl import app, flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import common  # noqa: E402

_RESULTS_DIR = flags.DEFINE_string(
    "results_dir", common.RESULTS_DIR, "Where the result JSONs are.", allow_override=True
)  # as in experiments.run and experiments.report.document
GRID_SOURCES = os.path.join(common.REPO_ROOT, "runs", "attack_quality")
REGIME_GRIDS = os.path.join(common.REPO_ROOT, "runs", "regimes")  # experiments.studies.regimes' --out_dir
ROUNDS_GRIDS = os.path.join(common.REPO_ROOT, "runs", "rounds")  # experiments.studies.rounds' --rounds_out_dir
CURVE_LABELS = {
    "central": "central",
    "central_lock": "central + lock",
    "fedavg": "FedAvg",
    "fedkl": "FedKL (a)",
    "fedkl_local_statistics": "FedKL, local statistics",
    "fedkl_private_lock": "FedKL, private lock init",
}


def accuracy_curves(table1, path):
    """One panel per setting: the mean curve over seeds of each column."""
    results = table1["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        seeds = list(result["per_seed"].values())
        for column, label in CURVE_LABELS.items():
            if column not in seeds[0]:
                continue
            rounds = sorted(int(r) for r in seeds[0][column]["curve"])
            mean = [sum(s[column]["curve"][str(r)] for s in seeds) / len(seeds) * 100 for r in rounds]
            ax.plot(rounds, mean, label=label, linestyle="--" if column.startswith("central") else "-")
        ax.set_title(f"{name} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
        ax.set_xlabel("epoch (central) / round (federated)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)  # per panel: settings may add variant curves
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def privacy_utility(doc, path):
    """Accuracy against the strongest attack's SSIM and aligned PSNR, one point per defence and
    server view (labels in a shared legend: the points crowd where attacks fail)."""
    points = doc["results"]["points"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    markers = "osD^v<>pP*Xhd8H"
    for ax, metric, label in ((axes[0], "ssim", "SSIM"), (axes[1], "aligned_psnr", "aligned PSNR (dB)")):
        for index, point in enumerate(points):
            ax.scatter(
                point[metric],
                point["accuracy"] * 100,
                marker=markers[index % len(markers)],
                s=45,
                label=point["defence"],
            )
        ax.set_xlabel(f"strongest attack: {label} (lower = more private)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.72, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _threat_rank(threat):
    from experiments.studies import regimes

    return regimes.THREAT_ORDER.index(threat) if threat in regimes.THREAT_ORDER else len(regimes.THREAT_ORDER)


def _success_line(ax, xs, rates, **style):
    """Success rates (`metrics.success_rate` dicts) against `xs`, in %, with their Wilson intervals as error bars."""
    errors = [  # the Wilson bounds can sit a rounding error inside the rate at 0 or 100 %
        [max(0.0, 100 * (r["rate"] - r["low"])) for r in rates],
        [max(0.0, 100 * (r["high"] - r["rate"])) for r in rates],
    ]
    ax.errorbar(xs, [100 * r["rate"] for r in rates], yerr=errors, marker="o", capsize=3, **style)


def _success_axes(ax, xlabel):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images recovered (%)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def privacy_over_rounds(doc, path):
    """Attack success (aligned SSIM >= 0.6, Wilson 95 % interval) against the round whose global model the
    client trains, FedAvg's run ('none') and FedKL's (the locked threats), and what the labels alone give (a
    dashed floor); one panel per client regime."""
    from experiments.studies import regimes

    results = doc["results"]
    panels = [("batch 1", ""), ("update: 8 images, 4 steps of 2", "-U8")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False)
    for ax, (title, suffix) in zip(axes[0], panels):
        by_threat = {}
        for name, threats in results.items():
            if name.startswith("T") and name.endswith(suffix) and (suffix or "-" not in name):
                for threat, summary in threats.items():
                    by_threat.setdefault(threat, []).append((int(name[1:].split("-")[0]), summary["success"]["ssim"]))
        for threat, points in sorted(by_threat.items(), key=lambda item: _threat_rank(item[0])):
            points.sort(key=lambda point: point[0])
            rounds = [r for r, _ in points]
            if threat == regimes.LABEL_FLOOR_KEY:  # the same images as their class means: no model, no attack
                ax.plot(
                    rounds,
                    [100 * p["rate"] for _, p in points],
                    linestyle="--",
                    color="grey",
                    label=regimes.LABEL_FLOOR,
                )
                continue
            # 'none' and the known-order oracle attack FedAvg's run, the other threats FedKL's.
            run = "FedAvg" if threat in ("none", regimes.ORDER_ORACLE) else "FedKL"
            label = f"{run}, {regimes.THREAT_LABELS.get(threat, threat)}"
            color = f"C{_threat_rank(threat)}"  # a threat keeps its colour in both panels
            _success_line(ax, rounds, [p for _, p in points], color=color, label=label)
        ax.set_title(title)
        _success_axes(ax, "round of the captured global model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pooled_rounds(doc, path):
    """Images recovered (aligned SSIM >= 0.6, Wilson 95 % interval) against the number K of one client's captures
    the server pools (experiments.studies.rounds): one line per defence, one panel per (regime, attack)."""
    from experiments.studies import rounds

    panels = [(regime, attack) for regime, by_row in doc["results"].items() for attack in rounds.ATTACKS]
    panels = [(r, a) for r, a in panels if any(a in by_attack for by_attack in doc["results"][r].values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5.2), squeeze=False)
    for ax, (regime, attack) in zip(axes[0], panels):
        shown = set()
        for index, (row, by_attack) in enumerate(doc["results"][regime].items()):
            if attack not in by_attack:
                continue
            points = sorted((int(k), entry) for k, entry in by_attack[attack].items())
            counts = [k for k, _ in points]
            shown.update(counts)
            label = f"{rounds.ROWS[row][0]} ({rounds.ROWS[row][2]})"
            _success_line(ax, counts, [e for _, e in points], color=f"C{index}", label=label)
        ax.set_title(f"{regime}: {rounds.REGIMES[regime][0]}; {attack}", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(shown), [str(k) for k in sorted(shown)])
        _success_axes(ax, "captures of one client pooled (K)")
    legend = {}  # one legend under the panels: every defence once, in row order
    for ax in axes[0]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
        ax.get_legend().remove()
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.05 * (len(legend) + 1) / 2, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Grids of other seeds worth a look: GRNN recovers most images of seed 2 when the attacker knows the
# round-1 lock weights and optimises the key (Table 6 analogue, adaptive-key).
SEED_GRIDS = ("grnn_fashion_mnist_adaptive_key_seed2",)


def candidates_frontier(doc, path):
    """The key-lock candidates' privacy-accuracy frontier (experiments.studies.candidates)."""
    from experiments.studies.candidates import table as candidates_table

    candidates_table.frontier_figure(doc, path)


def draw_all(
    results_dir=None, figures_dir=common.FIGURES_DIR, grid_sources=GRID_SOURCES, regime_grids=REGIME_GRIDS, log=print
):
    """Draws every figure whose results exist; returns the paths written."""
    docs = common.load_results(results_dir)
    os.makedirs(figures_dir, exist_ok=True)
    written = []
    drawings = (
        ("table1", accuracy_curves),
        ("privacy_utility", privacy_utility),
        ("regimes", privacy_over_rounds),
        ("candidates", candidates_frontier),
        ("rounds", pooled_rounds),
    )
    for name, draw in drawings:
        file_name = {
            "table1": "accuracy_curves.png",
            "regimes": "privacy_over_rounds.png",
            "candidates": "candidates_frontier.png",
            "rounds": "privacy_pooled_rounds.png",
        }.get(name, f"{name}.png")
        target = os.path.join(figures_dir, file_name)
        if name not in docs:
            log(f"skipped {os.path.basename(target)}: no {name}.json")
            continue
        draw(docs[name], target)
        written.append(target)
    if os.path.isdir(grid_sources):
        for experiment in sorted(os.listdir(grid_sources)):
            if "_seed" in experiment and experiment not in SEED_GRIDS:  # one grid per experiment: seed 0's
                continue
            source = os.path.join(grid_sources, experiment, "grid.png")
            if f"attacks_{experiment}" in docs and os.path.exists(source):
                target = os.path.join(figures_dir, f"grid_{experiment}.png")
                shutil.copyfile(source, target)
                written.append(target)
    if "regimes" in docs and os.path.isdir(regime_grids):
        for regime in sorted(docs["regimes"]["results"]):
            source = os.path.join(regime_grids, regime, "grid_seed0.png")
            if os.path.exists(source):
                target = os.path.join(figures_dir, f"grid_regime_{regime}.png")
                shutil.copyfile(source, target)
                written.append(target)
    return written + rounds_grids(docs, figures_dir)


def rounds_grids(docs, figures_dir, source=ROUNDS_GRIDS):
    """Copies seed 0's grid of each regime M row and attack (experiments.studies.rounds.draw_grids) as
    grid_rounds_<regime>-<row>_<attack>.png; returns the paths written."""
    written = []
    for regime, by_row in docs.get("rounds", {}).get("results", {}).items():
        for row, by_attack in by_row.items():
            for attack in by_attack:
                grid = os.path.join(source, f"{regime}-{row}", "seed0", f"grid_{attack}_client0.png")
                if os.path.exists(grid):
                    written.append(os.path.join(figures_dir, f"grid_rounds_{regime}-{row}_{attack}.png"))
                    shutil.copyfile(grid, written[-1])
    return written


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for path in draw_all(_RESULTS_DIR.value):
        print(f"wrote {os.path.relpath(path, common.REPO_ROOT)}")


if __name__ == "__main__":
    app.run(main)
