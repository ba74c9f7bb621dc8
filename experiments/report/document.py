"""Regenerates docs/REPORT.md from results/*.json (`make report`): the findings, one section per question.

  python -m experiments.report.document [--results_dir=results] [--report_path=docs/REPORT.md]

Each question is a few tables, each drawn from one result file and naming it; the raw numbers (every seed, file,
setting and note) stay in results/ (its JSON files and their .md pages). A table whose file is missing says so.
To add a table, add a `Part` to a `Question` in QUESTIONS; its content comes from the JSON files alone.
"""

import dataclasses
import os

from absl import app, flags

from experiments import common
from experiments.report import tables

_RESULTS_DIR = flags.DEFINE_string(
    "results_dir", common.RESULTS_DIR, "Where the result JSONs are.", allow_override=True
)  # as in experiments.run and experiments.report.figures
_OUT = flags.DEFINE_string(
    "report_path", common.REPORT_PATH, "The report to write; it shows the PNGs of the figures/ folder next to it."
)

THREATS = ("none", "oracle", "fixed-key", "adaptive", "adaptive-key")


@dataclasses.dataclass(frozen=True)
class Part:
    """One table of the report: `render(doc)` -> (columns, rows) from result file `source`."""

    caption: str
    source: str
    render: object


@dataclasses.dataclass(frozen=True)
class Question:
    title: str
    intro: str
    parts: tuple


def table(index):
    """A part showing the result file's table `index` as it is."""

    def render(doc):
        found = doc["tables"][index]
        return found["columns"], found["rows"]

    return render


def headline(doc):
    return ["metric", "value", "unit", "target"], [
        [h["metric"], h["value"], h.get("unit", ""), tables.target_cell(h)] for h in doc.get("headline", [])
    ]


def _rate(entry):
    rate = entry["ssim"]
    return f"{100 * rate['rate']:.0f} % ({rate['recovered']}/{rate['n']})"


def attack_pivot(doc):
    """success_rates.json: per batch-1 Fashion-MNIST setting, its seeds pooled, the share recovered per threat."""
    by_setting, floors = doc["results"]["by_setting"], doc["results"].get("label_floor", {})
    settings = [s for s in by_setting if s.endswith(("fashion_mnist", "_adaptive_key", "_private_lock"))]
    settings = [s for s in settings if by_setting[s][next(iter(by_setting[s]))]["n"] >= 30]
    rows = [
        [setting, _rate(floors[setting]) if setting in floors else "–"]
        + [_rate(by_setting[setting][t]) if t in by_setting[setting] else "–" for t in THREATS]
        for setting in settings
    ]
    return ["setting", "labels alone (class mean)", *THREATS], rows


def adaptive_pivot(doc):
    """adaptive_attacker.json: per attack, the share recovered under each threat and adaptive strategy."""
    by_attack = doc["results"]["by_attack"]
    variants = list(dict.fromkeys(v for by_variant in by_attack.values() for v in by_variant))
    rows = [[attack] + [_rate(e[v]) if v in e else "–" for v in variants] for attack, e in by_attack.items()]
    return ["attack", *variants], rows


def ablation_tables(doc):
    """ablations.json: the compact table of each ablation (its first, 'images recovered', table)."""
    compact = [t for t in doc["tables"] if "images recovered" in t["title"]]
    columns = ["ablation", *compact[0]["columns"][:1], *compact[0]["columns"][2:]]
    rows = [[t["title"].split(":")[0], *row[:1], *row[2:]] for t in compact for row in t["rows"]]
    return columns, rows


def speed_headlines(docs):
    """One table of every speed and scale benchmark's headline figures."""
    rows = []
    for name in SPEED:
        doc = docs.get(name)
        if doc and tables.is_envelope(doc):
            rows += [[name, h["metric"], h["value"], h.get("unit", ""), tables.target_cell(h)] for h in doc["headline"]]
    return ["benchmark", "metric", "value", "unit", "target"], rows


SPEED = (
    "keylock_overhead",
    "torch_compare",
    "federated_round",
    "scale",
    "workers",
    "torch_dlg_reference",
    "dlg_speed",
    "attack_startup",
    "startup",
)

QUESTIONS = (
    Question(
        "Does the paper's lock hold?",
        "Batch-1 gradients of the untrained LeNet on Fashion-MNIST (10 images x 3 seeds), each attack under each "
        "threat: share of images recovered (aligned SSIM >= 0.6). 'labels alone' scores each image's class mean: "
        "what knowing the labels gives without the gradient.",
        (
            Part("Success by attack and threat, seeds pooled", "success_rates", attack_pivot),
            Part("Table 6 analogue: aligned PSNR by attack and threat", "table6", table(0)),
            Part("The strongest adaptive attacker: each strategy", "adaptive_attacker", adaptive_pivot),
        ),
    ),
    Question(
        "Where do attacks work?",
        "Clients that really train: batches of 8, multi-step FedAvg updates, a real run's global model over "
        "its rounds, ResNet-20; every threat that can measure something (a threat facing the lock runs only where "
        "the attack beats the labels alone without it).",
        (
            Part("Realistic regimes: images recovered", "regimes", table(0)),
            Part("Realistic regimes: recovered beyond their labels", "regimes", table(1)),
            Part("Regime M: a client's captures pooled over rounds", "rounds", table(0)),
            Part("Held-out seeds behind R-inference-latent", "regimes_heldout", table(0)),
            Part("Ablations: one attack setting changed at a time", "ablations", ablation_tables),
            Part("How sharply a victim's gradient depends on its image", "gradient_sharpness", table(0)),
        ),
    ),
    Question(
        "What does the key protect?",
        "Does the shared model need the client's key? Accuracy of each entry of the key table, and the Table 1 "
        "analogue (central, central + lock, FedAvg, FedKL on identical backbones).",
        (
            Part("The key table", "key_table", table(0)),
            Part("Table 1 analogue: test accuracy", "table1", table(0)),
            Part("Table 1's FedKL runs: their evaluation matrix", "table1", table(1)),
        ),
    ),
    Question(
        "What does each candidate cost?",
        "Key-lock candidates against the strongest adaptive attacks, their accuracy against the FedAvg control, "
        "their key tables and train-step cost; then each defence's accuracy against the strongest attack on a "
        "client's update, and the lock's cost per step.",
        (
            Part("The frontier: each configuration's worst attack, accuracy and step", "frontier", table(0)),
            Part("Key-lock candidates", "candidates", table(0)),
            Part("The key table of each candidate", "candidates", table(1)),
            Part("Privacy against utility per defence", "privacy_utility", table(0)),
            Part("Cost of the key-lock block", "keylock_overhead", table(0)),
        ),
    ),
)


def part_markdown(part, docs, pages=()):
    """A part's table under its caption, naming its source (and the source's page in results/, if it has one)."""
    doc = docs.get(part.source)
    lines = [f"### {part.caption}", ""]
    if not (doc and tables.is_envelope(doc)):
        return lines + [f"No results yet (`results/{part.source}.json`).", ""]
    columns, rows = part.render(doc)
    source = f"Source: `results/{part.source}.json`" + (
        f" (every table: `results/{part.source}.md`)" if part.source in pages else ""
    )
    command = common.current_command(str(doc.get("command", "?")))
    return lines + [f"{source}; `{command}`.", "", tables.markdown_table(columns, rows), ""]


def question_markdown(number, question, docs, pages=()):
    lines = [f"## {number}. {question.title}", "", question.intro, ""]
    for part in question.parts:
        lines += part_markdown(part, docs, pages)
    return lines


def speed_markdown(number, docs):
    columns, rows = speed_headlines(docs)
    lines = [f"## {number}. Speed and scale", ""]
    lines += ["The headline figure of each speed and scale benchmark (ratios measured within one run, interleaved)."]
    lines += ["Each benchmark's tables: `results/<benchmark>.json`.", ""]
    return lines + ([tables.markdown_table(columns, rows), ""] if rows else ["No results yet.", ""])


def figures_markdown(figures_dir, report_dir):
    """The figures drawn from results/ as images; the reconstruction grids as one line of links."""
    if not os.path.isdir(figures_dir):
        return []
    names = sorted(n for n in os.listdir(figures_dir) if n.endswith(".png"))
    if not names:
        return []
    link = lambda name: os.path.relpath(os.path.join(figures_dir, name), report_dir)  # noqa: E731
    lines = ["## Figures", "", "Drawn by `python -m experiments.report.figures` from results/.", ""]
    for name in [n for n in names if not n.startswith("grid_")]:
        lines += [f"![{name[:-4]}]({link(name)})", ""]
    grids = [n for n in names if n.startswith("grid_")]
    if grids:
        lines += ["Reconstruction grids (truth on top, one row per threat): "]
        lines += [", ".join(f"[{n[5:-4]}]({link(n)})" for n in grids) + ".", ""]
    return lines


def sources_markdown(docs):
    """Where each result came from: its command, commit, date and wall time."""
    envelopes = {n: d for n, d in docs.items() if tables.is_envelope(d)}
    rows = [
        [
            name,
            f"`{common.current_command(str(doc.get('command', '?')))}`",
            str(doc.get("git_commit", "?"))[:12],
            str(doc.get("date", "?"))[:10],
            None if not doc.get("duration_s") else round(doc["duration_s"] / 60, 1),
        ]
        for name, doc in envelopes.items()
        if not name.startswith("attacks_")
    ]
    attacks = [n for n in envelopes if n.startswith("attacks_")]
    lines = ["## Sources", "", "The command that wrote each result file, by its module's name today (rerun it, then "]
    lines[-1] += "`make report`); the commit and date of that run."
    if attacks:
        lines += [
            f"The {len(attacks)} `results/attacks_*.json` files (per-image metrics of each attack setting) come "
            "from `python -m experiments.studies.attack_quality` (`--attack_set`, `--attack_seeds`)."
        ]
    return lines + ["", tables.markdown_table(["result", "command", "commit", "date", "minutes"], rows), ""]


def report_markdown(docs, questions=QUESTIONS, figures=(), pages=()):
    lines = [
        "# tfkl report",
        "",
        "Generated by `make report` (`python -m experiments.report.document`) from results/*.json; do not edit by "
        "hand. The findings by question; every table names the result file it comes from, whose Markdown page "
        "(results/<name>.md) has all its tables and notes. " + common.SHARED_MACHINE_NOTE,
        "",
    ]
    for number, question in enumerate(questions, 1):
        lines += question_markdown(number, question, docs, pages)
    lines += speed_markdown(len(questions) + 1, docs)
    lines += list(figures)
    lines += sources_markdown(docs)
    return "\n".join(lines).rstrip() + "\n"


def render_report(results_dir, report_dir):
    """The report of `results_dir`, showing the figures in report_dir/figures/."""
    figures = figures_markdown(os.path.join(report_dir, "figures"), report_dir)
    pages = {n[:-3] for n in os.listdir(results_dir) if n.endswith(".md")} if os.path.isdir(results_dir) else ()
    return report_markdown(common.load_results(results_dir), figures=figures, pages=pages)


def write_report(results_dir, out):
    """Writes the report of `results_dir` to `out`, with the figures in the figures/ folder next to `out`."""
    text = render_report(results_dir, os.path.dirname(os.path.abspath(out)))
    with open(out, "w") as f:
        f.write(text)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    print(write_report(_RESULTS_DIR.value, _OUT.value))


if __name__ == "__main__":
    app.run(main)
