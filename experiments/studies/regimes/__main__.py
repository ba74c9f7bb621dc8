"""The regimes' program: attacks every pending cell (resumable), then tabulates what is stored.

python -m experiments.studies.regimes                          # every regime, seed and threat (resumable)
python -m experiments.studies.regimes --regimes=G8,U8 --threats=none,oracle --seeds=0
python -m experiments.studies.regimes --tabulate_only          # tables and grids from all that is stored
"""

import re
import sys
import time

from absl import flags

from experiments import cells, runtime
from experiments.studies.regimes import (
    ATTACK_THREATS,
    NAME,
    ORDER_ORACLE,
    RECORDS_DIR,
    REGIMES,
    SEEDS,
    THREAT_ORDER,
    WORK_DIR,
    Store,
    run,
    table,
)

_REGIMES = flags.DEFINE_list(
    "regimes", list(REGIMES), "Regimes to run, in order (the tables cover every regime and threat stored)."
)
_THREATS = flags.DEFINE_list(
    "threats", list(THREAT_ORDER), "Threats to run, in this order (per regime: those that apply)."
)
_SEEDS = flags.DEFINE_list(
    "seeds", [str(s) for s in SEEDS], "Seeds (victim weights, key, lock, images, attack starts)."
)
_RECORDS_DIR = flags.DEFINE_string(
    "records_dir",
    RECORDS_DIR,
    "Where each client's result record goes (small JSON files kept in the repository; the tables' only input).",
)
_OUT_DIR = flags.DEFINE_string(
    "out_dir", WORK_DIR, "Where reconstructions, captured updates, logs, grids and the training runs go."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the data sets are (default: tfkl.data's).")
_PARALLEL = flags.DEFINE_integer(
    "parallel_cells",
    cells.DEFAULT_WORKERS,
    "Cells run at a time, each in its own process (of one threat; see run_cells).",
    lower_bound=1,
)
_TABULATE_ONLY = flags.DEFINE_bool("tabulate_only", False, "Run nothing: tabulate what is stored.")
_RESULTS_NAME = flags.DEFINE_string(
    "results_name", NAME, "The tables go to results/<this>.json and .md (e.g. one set of records apart)."
)
_CELL = flags.DEFINE_string("cell", None, "Internal: run one cell 'regime/seed/threat' in this process.")
flags.register_validator(
    "regimes",
    lambda v: bool(v) and set(v) <= set(REGIMES),
    f"--regimes takes a comma-separated list from {', '.join(REGIMES)}",
)
flags.register_validator(
    "threats",
    lambda v: bool(v) and set(v) <= set(ATTACK_THREATS) | {ORDER_ORACLE},
    f"--threats takes a comma-separated list from {', '.join(ATTACK_THREATS + (ORDER_ORACLE,))}",
)
flags.register_validator(
    "results_name", lambda v: bool(re.fullmatch(r"[a-z0-9_]+", v)), "--results_name takes [a-z0-9_]+"
)
flags.register_validator(
    "seeds", lambda v: bool(v) and all(s.isdigit() for s in v), "--seeds takes comma-separated non-negative integers"
)


def main(argv):
    del argv
    store = Store(_RECORDS_DIR.value, _OUT_DIR.value)
    if _CELL.value:
        name, seed, threat = _CELL.value.split("/")
        run.run_cell(REGIMES[name], int(seed), threat, store, _DATA_DIR.value, log=lambda line: print(line, flush=True))
        return
    seeds = [int(s) for s in _SEEDS.value]
    regimes = [REGIMES[r] for r in _REGIMES.value]
    start = time.perf_counter()
    try:
        if not _TABULATE_ONLY.value:
            if any(r.round is not None for r in regimes):
                run.train_runs(store, _DATA_DIR.value)
            for model_name in sorted({r.model for r in regimes if r.attack == "prior"}):  # before parallel cells
                run.prior_decoder(store, model_name, _DATA_DIR.value)
            run.run_cells(regimes, seeds, _THREATS.value, store, _DATA_DIR.value, _PARALLEL.value)
        # Every regime and threat stored for these seeds: a run on a few cells does not drop the others' rows.
        path, markdown = table.publish_main_table(start, store, seeds, _DATA_DIR.value, _RESULTS_NAME.value)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {path} and {markdown}")


if __name__ == "__main__":
    runtime.run(main)
