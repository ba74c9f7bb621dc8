"""What limits R-inference: the attack's settings varied on the same victims.

  python -m benchmarks.r_ablation                   # every variant (resumable), then the table
  python -m benchmarks.r_ablation --ablation_tabulate_only

R-inference (benchmarks.regimes: ResNet-20, batch 1, the client's BatchNorm in inference mode) recovers few
images with Inverting Gradients as configured there. Each variant attacks the same victims under 'none':
seed 10 (weights and images 40-43 of the training set, outside the table's seeds 0-2), one setting changed
at a time. Restarts are chosen by the attack's loss; the budget curves read the truth only to score.
Each variant runs in its own process and stores each client's result as benchmarks.regimes does.
"""

import dataclasses
import os
import subprocess
import sys
import time

from absl import flags
import numpy as np

from benchmarks import common, regimes, tables
from tff_programs import launch

NAME = "r_ablation"
SEED = 10
BASE = dataclasses.replace(regimes.REGIMES["R-inference"], clients=4)
VARIANTS = tuple(
    dataclasses.replace(BASE, name="-".join(["R-inference", *suffix]), description=description, **change)
    for suffix, description, change in (
        ((), "IG as benchmarks.regimes runs it: TV 1e-4, 2,000 iterations, 1 restart", {}),
        (("4-restarts",), "IG with 4 restarts (the attack's loss picks one)", dict(restarts=4)),
        (("TV-1e-3",), "IG with ten times the TV weight", dict(tv=1e-3)),
        (("8000-iterations",), "IG with four times the iterations", dict(iterations=8000)),
        (("GRNN",), "GRNN instead of IG", dict(attack="grnn")),
    )
)
_BY_NAME = {v.name: v for v in VARIANTS}

_DIR = flags.DEFINE_string("ablation_dir", "runs/r_ablation", "Where each variant's client results go.")
_TABULATE_ONLY = flags.DEFINE_bool("ablation_tabulate_only", False, "Run nothing: tabulate what is stored.")
_VARIANT = flags.DEFINE_enum("ablation_variant", None, list(_BY_NAME), "Internal: run one variant in this process.")


def run_variants(out_dir, data_dir=None, log=print):
    """Runs each variant's pending clients in its own process; raises RuntimeError naming one that fails."""
    for variant in VARIANTS:
        if not regimes.pending_clients(out_dir, variant, SEED, "none"):
            continue
        directory = regimes.cell_dir(out_dir, variant.name, SEED, "none")
        os.makedirs(directory, exist_ok=True)
        log(f"== {variant.name}")
        command = [sys.executable, "-m", "benchmarks.r_ablation", f"--ablation_variant={variant.name}"]
        command += [f"--ablation_dir={out_dir}"] + ([f"--data_dir={data_dir}"] if data_dir else [])
        with open(os.path.join(directory, "log.txt"), "a") as log_file:
            code = subprocess.call(command, stdout=log_file, stderr=subprocess.STDOUT)
        if code:
            raise RuntimeError(f"variant {variant.name!r} failed (exit {code}); see {directory}/log.txt")


def tabulate(out_dir, data_dir=None, log=print):
    """benchmarks.regimes' tables and grids over the stored variants."""
    payload = regimes.tabulate(out_dir, list(VARIANTS), [SEED], ["none"], data_dir, log=log)
    payload["tables"] = [table for table in payload["tables"] if table["rows"]]  # no label counting at batch 1
    per_image = [_per_image_row(out_dir, variant) for variant in VARIANTS]
    payload["tables"].insert(
        1,
        dict(
            title="per victim: aligned SSIM of the image the attack returns (the attack's final loss; IG: 1 - cos "
            "+ TV, GRNN: its own loss): does a lower loss mean a better image?",
            columns=["variant"] + [f"victim {client}" for client in range(VARIANTS[0].clients)],
            rows=[row for row in per_image if row],
        ),
    )
    payload["notes"] = regimes.NOTES[:1] + [
        f"Seed {SEED}: the victims' weights and images {SEED * BASE.images_per_seed}-"
        f"{(SEED + 1) * BASE.images_per_seed - 1} of the Fashion-MNIST training set, outside the table's seeds.",
        "The table's R-inference row and benchmarks.gradient_sharpness give the scale of the attack's final loss.",
        common.SHARED_MACHINE_NOTE,
    ]
    return payload


def _per_image_row(out_dir, variant):
    results = regimes.load_cell(out_dir, variant, SEED, "none")
    if not results:
        return None
    cells = {}
    for r in results:
        cells[r["client"]] = f"{r['per_image']['aligned_ssim'][0]:.2f} ({np.nanmin(r['restart_losses']):.2g})"
    return [variant.name] + [cells.get(client, "not run") for client in range(variant.clients)]


def main(argv):
    del argv
    log = lambda line: print(line, flush=True)  # noqa: E731
    data_dir = flags.FLAGS.data_dir  # benchmarks.regimes' flag
    if _VARIANT.value:
        regimes.run_cell(_BY_NAME[_VARIANT.value], SEED, "none", _DIR.value, data_dir, log=log)
        return
    start = time.perf_counter()
    if not _TABULATE_ONLY.value:
        try:
            run_variants(_DIR.value, data_dir, log)
        except RuntimeError as e:
            sys.exit(f"error: {e}")
    path, markdown = tables.write_result_and_page(
        NAME, tabulate(_DIR.value, data_dir, log), time.perf_counter() - start
    )
    print(f"wrote {path} and {markdown}")


if __name__ == "__main__":
    launch.run(main)
