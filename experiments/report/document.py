"""Regenerates docs/REPORT.md from results/*.json (`make report`).

  python -m experiments.report.document [--results_dir=results] [--report_path=docs/REPORT.md]

The report has one section per topic in SECTIONS, each listing the result files present for it
(a benchmark's JSON with its tables, or the plain JSONs a script writes); topics without results
say so, and files no topic claims land in "Other results". Every table names its command.
To add a section, add a topic here; its content comes from the JSON files alone.
"""

import collections
import fnmatch
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

Topic = collections.namedtuple("Topic", "title patterns intro command")

SECTIONS = (
    Topic(
        "Attacks",
        ("success_rates", "table6", "torch_dlg_reference", "dlg_speed", "attack_quality", "attacks_*"),
        "Gradient inversion against plain and locked models, and the PyTorch DLG reference.",
        None,
    ),
    Topic(
        "The strongest adaptive attacker (issue 12, section 1)",
        ("adaptive_attacker",),
        "Each attack under 'none', 'oracle', the first adaptive attacker ('joint') and the new adaptive strategies "
        "(attacks/README.md), batch 1, untrained LeNet, Fashion-MNIST, the stored results' images and seeds. Success "
        "rates first; rows marked UPPER BOUND pick the best per image by the truth and are no attacker's rate.",
        "python -m experiments.studies.adaptive_attacker",
    ),
    Topic(
        "Attacks in realistic regimes",
        ("regimes", "regimes_stored", "regimes_heldout", "gradient_sharpness", "ablations"),
        "Batches of 8, multi-step FedAvg updates, a real run's global model over its rounds and ResNet-20, under "
        "every threat: where the attacks succeed without a defence, and what the lock changes there; then how "
        "sharply each victim's gradient depends on its image (what limits the attacks on ResNet-20; "
        "`python -m experiments.run --only=gradient_sharpness`), and R-inference and U16 with one attack setting "
        "changed at a time (`python -m experiments.studies.ablations`). `regimes` is tabulated from the records in "
        "results/regimes_cells/; `regimes_stored` is the first measurement (its records lost), kept for comparison; "
        "`regimes_heldout` the pilot seeds 5-6 behind R-inference-latent.",
        "python -m experiments.studies.regimes",
    ),
    Topic(
        "Accuracy: Table 1 analogue and the key table",
        ("table1",),
        "Central, central + lock, FedAvg and FedKL on identical backbones, and the FedKL run's evaluation matrix.",
        None,
    ),
    Topic(
        "A key that matters (issue 12, section 2)",
        ("key_table",),
        "Does the shared model need the client's key? FedKL with the paper's uniform keys, zero-mean gaussian and "
        "rademacher keys, and uniform keys with the random-key penalty, against the FedAvg control (the lock "
        "blocks replaced by a learned affine); each run's key table, lock recovery beside the same model trained "
        "from scratch on the same public examples.",
        "python -m experiments.studies.key_table",
    ),
    Topic(
        "Key-lock candidates: a configuration that holds? (issue 12, section 3)",
        ("candidates",),
        "Each candidate configuration against the strongest adaptive attacker (GRNN and IG, batch 1), its accuracy "
        "against the FedAvg control (LeNet Fashion-MNIST, ResNet-20 digits), its key table and its train-step "
        "cost; the frontier figure is candidates_frontier.png.",
        "python -m experiments.studies.candidates",
    ),
    Topic(
        "Cost of the key-lock block",
        ("keylock_overhead",),
        "Training step and forward pass of the same backbone with and without the lock.",
        None,
    ),
    Topic(
        "tf.keras vs PyTorch",
        ("torch_compare",),
        "Training throughput of our locked models against our PyTorch port of the official ones.",
        None,
    ),
    Topic(
        "Central baselines",
        ("central_*",),
        "Centralised training with and without the lock; the locked runs also report a random key's accuracy.",
        "bash scripts/central_baselines.sh",
    ),
    Topic("Federated round", ("federated_round",), "One FedKL round in TFF against plain Keras training.", None),
    Topic("Scale", ("scale",), "Round time and peak memory as the client population grows.", None),
    Topic(
        "Privacy vs utility",
        ("privacy_utility",),
        "Each defence's accuracy after federated training against the strongest attack on a client's update.",
        None,
    ),
    Topic("TFF workers", ("workers",), "The simulation on remote TFF workers.", None),
)


def assign(docs, sections=SECTIONS):
    """Maps each topic to its result files (in its patterns' order, then file order); unclaimed files go to
    'Other results'."""
    claimed, by_topic = set(), collections.OrderedDict()
    for topic in sections:
        names = []
        for pattern in topic.patterns:
            names += [n for n in docs if n not in claimed and n not in names and fnmatch.fnmatch(n, pattern)]
        claimed.update(names)
        by_topic[topic] = names
    other = [n for n in docs if n not in claimed]
    if other:
        other_topic = Topic(
            "Other results", (), "Result files no section of experiments/report/document.py claims yet.", None
        )
        by_topic[other_topic] = other
    return by_topic


def section_markdown(topic, names, docs):
    lines = [f"## {topic.title}", "", topic.intro, ""]
    if not names:
        wanted = ", ".join(f"`{p}.json`" for p in topic.patterns)
        return "\n".join(lines + [f"No results yet ({wanted} in results/).", ""])
    envelopes = [n for n in names if tables.is_envelope(docs[n])]
    loose = {n: docs[n] for n in names if n not in envelopes}
    for name in envelopes:
        lines += [tables.benchmark_section(name, docs[name])]
    if loose:
        commands = sorted({str(d["command"]) for d in loose.values() if isinstance(d, dict) and "command" in d})
        command = ", ".join(f"`{c}`" for c in commands) or (
            f"`{topic.command}`" if topic.command else "not recorded in the JSON files"
        )
        lines += [
            f"Command: {command}. Files: " + ", ".join(f"`{n}.json`" for n in loose) + ".",
            "",
            tables.loose_table(loose),
            "",
        ]
    return "\n".join(lines)


def figures_markdown(figures_dir, report_dir):
    """Image links to the PNGs of experiments/report/figures.py, relative to the report's directory."""
    if not os.path.isdir(figures_dir):
        return []
    names = sorted(n for n in os.listdir(figures_dir) if n.endswith(".png"))
    if not names:
        return []
    lines = [
        "## Figures",
        "",
        "Drawn by `python -m experiments.report.figures` from the JSON files below "
        "(reconstruction grids: truth on top, then one row per threat as in the experiment's table).",
        "",
    ]
    for name in names:
        link = os.path.relpath(os.path.join(figures_dir, name), report_dir)
        lines += [f"### {name[:-4]}", "", f"![{name[:-4]}]({link})", ""]
    return lines


def run_times_markdown(docs):
    """How long each result took to make on this machine (the envelope's duration_s), longest first."""
    rows = sorted(
        (
            [name, f"`{doc['command']}`", round(doc["duration_s"] / 60, 1), doc["date"][:10]]
            for name, doc in docs.items()
            if tables.is_envelope(doc) and doc.get("duration_s") and not doc.get("quick")
        ),
        key=lambda row: -row[2],
    )
    if not rows:
        return []
    return [
        "## Run times",
        "",
        "Wall time of each result's command on this 2-core machine (shared with other "
        "jobs: treat as an upper bound); a command that reuses cached runs shows the time of its last call.",
        "",
        tables.markdown_table(["result", "command", "minutes", "date"], rows),
        "",
    ]


def report_markdown(docs, sections=SECTIONS, figures=()):
    lines = [
        "# tfkl report",
        "",
        "Generated by `make report` (`python -m experiments.report.document`) from results/*.json; do not edit "
        "by hand: rerun the command named above a table to refresh it, then `make report`. "
        + common.SHARED_MACHINE_NOTE,
        "",
    ]
    topics = assign(docs, sections)
    # In the sections' order: the attack success rates first.
    summary_rows = [
        row for names in topics.values() for name in names for row in tables.headline_rows(name, docs[name])
    ]
    if summary_rows:
        lines += [
            "## Headline figures",
            "",
            tables.markdown_table(["benchmark", "metric", "value", "unit", "target", "run"], summary_rows),
            "",
        ]
    lines += list(figures)
    for topic, names in topics.items():
        lines += [section_markdown(topic, names, docs)]
    lines += run_times_markdown(docs)
    return "\n".join(lines).rstrip() + "\n"


def write_report(results_dir, out):
    """Writes the report of `results_dir` to `out`, with the figures in the figures/ folder next to `out`."""
    report_dir = os.path.dirname(os.path.abspath(out))
    figures = figures_markdown(os.path.join(report_dir, "figures"), report_dir)
    text = report_markdown(common.load_results(results_dir), figures=figures)
    with open(out, "w") as f:
        f.write(text)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    print(write_report(_RESULTS_DIR.value, _OUT.value))


if __name__ == "__main__":
    app.run(main)
