"""What limits the regimes whose target is not reached: the attack's settings varied on the same victims.

  python -m experiments.studies.ablations                             # every ablation (resumable), then the tables
  python -m experiments.studies.ablations --ablations=R-inference     # run one of them (the tables show all stored)
  python -m experiments.studies.ablations --ablation_tabulate_only

Each ablation takes a regime of experiments.studies.regimes as configured there and changes one setting of the attack at
a time, on victims of seeds outside the table's 0-2 (their own weights and images), under 'none'. Restarts are
chosen by the attack's loss; the budget curves and scores read the truth only to score. Every (variant, seed)
runs in its own process and stores each client's result as experiments.studies.regimes does (a JSON record under
--ablation_records_dir, kept in the repository; the rest under --ablation_dir), so a rerun resumes.
  R-inference  ResNet-20, batch 1, the client's BatchNorm in inference mode: 4 victims of seed 10
  U16          FedAvg updates over 16 images in 4 steps of 4, GRNN and IG: 1 client of 16 images per seed 5, 6, 7
"""

import dataclasses
import os
import sys
import time

from absl import flags
import numpy as np

from experiments import cells, common, runtime
from experiments.studies import regimes
from experiments.studies.regimes import run as regimes_run
from experiments.studies.regimes import table as regimes_table

NAME = "ablations"


@dataclasses.dataclass(frozen=True)
class Ablation:
    """`variants`: the regime as configured first, then each with one setting changed; `seeds`: the victims'."""

    seeds: tuple[int, ...]
    variants: tuple[regimes.Regime, ...]


def _variants(base, changes):
    return tuple(
        dataclasses.replace(base, name="-".join([base.name, *suffix]), description=description, **change)
        for suffix, description, change in changes
    )


ABLATIONS = {
    "R-inference": Ablation(
        seeds=(10,),
        variants=_variants(
            dataclasses.replace(regimes.REGIMES["R-inference"], clients=4),
            (
                ((), "IG as experiments.studies.regimes runs it: TV 1e-4, 2,000 iterations, 1 restart", {}),
                (("4-restarts",), "IG with 4 restarts (the attack's loss picks one)", dict(restarts=4)),
                (("TV-1e-3",), "IG with ten times the TV weight", dict(tv=1e-3)),
                (("8000-iterations",), "IG with four times the iterations", dict(iterations=8000)),
                (("GRNN",), "GRNN instead of IG", dict(attack="grnn")),
            ),
        ),
    ),
    "U16": Ablation(
        seeds=(5, 6, 7),
        variants=_variants(
            regimes.REGIMES["U16-GRNN"],
            (
                ((), "GRNN as experiments.studies.regimes runs it: 2,000 iterations, 2 restarts", {}),
                (("4-restarts",), "GRNN with 4 restarts (the attack's loss picks one)", dict(restarts=4)),
            ),
        )
        + _variants(
            regimes.REGIMES["U16"],
            (
                ((), "IG as experiments.studies.regimes runs it: TV 1e-4, 2,000 iterations, 2 restarts", {}),
                (("TV-1e-3",), "IG with ten times the TV weight", dict(tv=1e-3)),
            ),
        ),
    ),
}
_VARIANTS = {v.name: v for ablation in ABLATIONS.values() for v in ablation.variants}

_ABLATIONS = flags.DEFINE_list("ablations", list(ABLATIONS), f"Ablations to run, from {', '.join(ABLATIONS)}.")
_RECORDS_DIR = flags.DEFINE_string(
    "ablation_records_dir",
    os.path.join(common.RESULTS_DIR, "ablations_cells"),
    "Where each variant's client result records go (kept in the repository; the tables' only input).",
)
_DIR = flags.DEFINE_string(
    "ablation_dir", "runs/ablations", "Where reconstructions, captured updates, logs and grids go."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the data sets are (default: tfkl.data's).")
_TABULATE_ONLY = flags.DEFINE_bool("ablation_tabulate_only", False, "Run nothing: tabulate what is stored.")
_CELL = flags.DEFINE_string("ablation_cell", None, "Internal: run one 'variant/seed' in this process.")
flags.register_validator(
    "ablations",
    lambda v: bool(v) and set(v) <= set(ABLATIONS),
    f"--ablations takes a comma-separated list from {', '.join(ABLATIONS)}",
)


def run_ablation(ablation, store, data_dir=None, log=print):
    """Runs each pending (variant, seed) in its own process, in the engine's pool; raises RuntimeError naming
    the first that fails, once the others are done."""
    jobs = []
    for variant in ablation.variants:
        for seed in ablation.seeds:
            command = cells.module_command("experiments.studies.ablations", f"--ablation_cell={variant.name}/{seed}")
            command += [f"--ablation_records_dir={store.records}", f"--ablation_dir={store.work}"]
            command += [f"--data_dir={data_dir}"] if data_dir else []
            jobs.append(regimes_run.cell_job(command, variant, seed, "none", store))
    cells.run_jobs(jobs, log=log)


def tabulate(store, data_dir=None, log=print):
    """Per ablation with results stored, experiments.studies.regimes' success, detail and budget-curve tables over its
    variants (and at batch 1 each victim's image and final loss); grids under store.work."""
    payload = dict(settings={}, results={}, tables=[], headline=[], notes=regimes_table.NOTES[:1])
    for name, ablation in ABLATIONS.items():
        part = regimes_table.tabulate(store, list(ablation.variants), list(ablation.seeds), ["none"], data_dir, log=log)
        compact, _, detailed, *_, curves = part["tables"]  # cost: see the seconds per image; no label counting
        if not part["results"]:
            continue
        for table in (compact, detailed, curves):
            table["title"] = f"{name}: {table['title']}"
        per_victim = []
        if ablation.variants[0].images_per_client == 1:
            per_victim = [_per_victim_table(store, name, ablation)]
        payload["tables"] += [compact, *per_victim, detailed, curves]
        for key in ("settings", "results"):
            payload[key].update(part[key])
        payload["headline"] += part["headline"]
        first, last = ablation.seeds[0], ablation.seeds[-1]
        per_seed = ablation.variants[0].images_per_seed
        payload["notes"].append(
            f"{name}: seeds {', '.join(map(str, ablation.seeds))}, the victims' weights and images "
            f"{first * per_seed}-{(last + 1) * per_seed - 1} of the Fashion-MNIST training set (per seed its own), "
            "outside the table's seeds."
        )
    payload["notes"].append(common.SHARED_MACHINE_NOTE)
    return payload


def _per_victim_table(store, name, ablation):
    seed, clients = ablation.seeds[0], ablation.variants[0].clients
    rows = []
    for variant in ablation.variants:
        results = {r["client"]: r for r in regimes.load_cell(store, variant, seed, "none")}
        if results:
            rows.append([variant.name] + [_ssim_and_loss(results.get(client)) for client in range(clients)])
    return dict(
        title=f"{name}: per victim, aligned SSIM of the image the attack returns (the attack's final loss; IG: "
        "1 - cos + TV, GRNN: its own loss): does a lower loss mean a better image?",
        columns=["variant"] + [f"victim {client}" for client in range(clients)],
        rows=rows,
    )


def _ssim_and_loss(result):
    if result is None:
        return "not run"
    return f"{result['per_image']['aligned_ssim'][0]:.2f} ({np.nanmin(result['restart_losses']):.2g})"


def main(argv):
    del argv
    log = lambda line: print(line, flush=True)  # noqa: E731
    data_dir = _DATA_DIR.value
    store = regimes.Store(_RECORDS_DIR.value, _DIR.value)
    if _CELL.value:
        variant, seed = _CELL.value.split("/")
        regimes_run.run_cell(_VARIANTS[variant], int(seed), "none", store, data_dir, log=log)
        return
    start = time.perf_counter()
    try:
        if not _TABULATE_ONLY.value:
            for name in _ABLATIONS.value:
                run_ablation(ABLATIONS[name], store, data_dir, log)
        payload = tabulate(store, data_dir, log)
        path, markdown = cells.publish(NAME, payload, time.perf_counter() - start, store.records)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {path} and {markdown}")


if __name__ == "__main__":
    runtime.run(main)
