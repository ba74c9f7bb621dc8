"""The one engine under every study in experiments/: cells, their records, the process pool, resume, tabulation.

A cell is (study, regime, threat, attack, seed): one attack on the clients (or images) of one regime at one
seed under one threat. What a cell finds is kept as records, one small JSON file per unit (a client, or an
image) in a `RecordStore`: each is written to a temporary file and renamed into place (`tfkl.files.atomic_write`),
so a record is there whole or not at all, and its presence marks its unit as done. A run that is killed loses
nothing done: a rerun attacks only the units `RecordStore.pending` lists.

Cells run as processes, at most `workers` at a time (default 2: the machine's cores), through `run_jobs`; a
study's whole commands (a training run, an evaluation) are cached with the commands that made them by
`run_cached`. Tabulation has one path: the records -> the study's table rows -> `publish`, which writes
results/<name>.json and its Markdown page results/<name>.md (and refuses to drop results already published).
"""

from collections.abc import Callable, Iterable, Sequence
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import time

from experiments import common
from experiments.report import tables
from tfkl.files import atomic_write

DEFAULT_WORKERS = 2


@dataclasses.dataclass(frozen=True)
class Cell:
    """One attack: a study's `regime` (or configuration) at `seed` under `threat`, by `attack`."""

    study: str
    regime: str
    threat: str | None
    attack: str
    seed: int

    def __str__(self):
        return f"{self.study}:{self.regime}/{self.attack}/{self.seed}/{self.threat or '-'}"


@dataclasses.dataclass(frozen=True)
class RecordStore:
    """The records of a study's cells: `root`/`layout(cell)`/`record_name.format(unit)`, JSON written atomically.

    `layout` places a cell's records (a study keeps the layout its stored records have); `indent` and
    `trailing_newline` the format they are written in."""

    root: str
    layout: Callable[[Cell], str]
    record_name: str = "client_{:02d}.json"
    indent: int = 1
    trailing_newline: bool = False

    def cell_dir(self, cell):
        return os.path.join(self.root, self.layout(cell))

    def path(self, cell, unit):
        """A unit's record; written last, it marks the unit as done."""
        return os.path.join(self.cell_dir(cell), self.record_name.format(unit))

    def has(self, cell, unit):
        return os.path.exists(self.path(cell, unit))

    def read(self, cell, unit):
        with open(self.path(cell, unit)) as f:
            return json.load(f)

    def load(self, cell, units):
        """{unit: record} of the stored units among `units`, in their order."""
        return {unit: self.read(cell, unit) for unit in units if self.has(cell, unit)}

    def pending(self, cell, units):
        """The units among `units` without a record: what a (re)run still has to do."""
        return [unit for unit in units if not self.has(cell, unit)]

    def complete(self, cell, units):
        return not self.pending(cell, units)

    def write(self, cell, unit, record):
        """Stores `record` (JSON-able; NumPy values become numbers) atomically; returns its path."""
        path = self.path(cell, unit)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_write(path, binary=False) as f:
            json.dump(record, f, indent=self.indent, default=common.json_default)
            if self.trailing_newline:
                f.write("\n")
        return path


@dataclasses.dataclass(frozen=True)
class Job:
    """A process to run in the pool: `command` (an argv), its output appended to `log_path`. `done` is asked
    just before it would start (resume: a job whose records are all stored does not run); `name` is what a
    failure names."""

    name: str
    command: Sequence[str]
    log_path: str
    done: Callable[[], bool] = lambda: False
    cell: Cell | None = None
    env: dict | None = None
    cwd: str | None = None
    announce: str | None = None  # logged when it starts (default "== <name>")


def cell_job(store, cell, units, command, log_path, name=None, also=(), announce=None):
    """The pool's job running `command` (an argv: one study's cell mode) for `cell`, done once `store` holds a
    record of every unit in `units` for it and for each cell in `also` (a job that attacks several cells)."""
    return Job(
        name=name or str(cell),
        command=command,
        log_path=log_path,
        done=lambda: all(store.complete(c, units) for c in (cell, *also)),
        cell=cell,
        env=child_env(),
        announce=announce,
    )


def run_pending(store, cell, units, attack, chunk_size=None, log=print):
    """Attacks the units of `cell` that have no record in `store`, `chunk_size` at a time (default: all at once):
    `attack(units)` yields (unit, record) pairs, each written as soon as it comes, so a killed run loses only the
    units being attacked. Returns the units it attacked."""
    pending = store.pending(cell, units)
    step = chunk_size or max(1, len(pending))
    for start in range(0, len(pending), step):
        for unit, record in attack(pending[start : start + step]):
            store.write(cell, unit, record)
    if pending:
        log(f"{cell}: {len(pending)} units attacked")
    return pending


def launch(job):
    """Runs one job's process to its end; returns its exit code (the pool's only contact with processes)."""
    os.makedirs(os.path.dirname(os.path.abspath(job.log_path)), exist_ok=True)
    with open(job.log_path, "a") as log_file:  # a file, never a pipe: TFF's workers can outlive its reader
        return subprocess.call(list(job.command), stdout=log_file, stderr=subprocess.STDOUT, env=job.env, cwd=job.cwd)


def _run_job(job, log):
    if job.done():
        return None
    log(job.announce or f"== {job.name}")
    code = launch(job)
    return f"{job.name} failed (exit {code}); see {job.log_path}" if code else None


def run_jobs(jobs: Iterable[Job], workers=DEFAULT_WORKERS, log=print):
    """Runs every job that is not done, each in its own process, at most `workers` at a time. Once all have
    ended, raises RuntimeError naming the first (in `jobs`' order) that failed, if one did."""
    with concurrent.futures.ThreadPoolExecutor(max(1, int(workers))) as pool:
        futures = [pool.submit(_run_job, job, log) for job in jobs]
    failures = [failure for failure in (future.result() for future in futures) if failure]
    if failures:
        raise RuntimeError(failures[0])


def module_command(module, *args):
    """The argv running `python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def child_env(**extra):
    """The environment of a cell's process: the repository on PYTHONPATH, TensorFlow's C++ logs quiet."""
    return dict(os.environ, PYTHONPATH=common.REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3", **extra)


# -- whole commands, cached with what made them ------------------------------------------------------------
def stamp_path(out):
    return out + ".commands"


def is_cached(out, stamp):
    """True when `out` exists and was made by the commands `stamp` records."""
    if not (os.path.exists(out) and os.path.exists(stamp_path(out))):
        return False
    with open(stamp_path(out)) as f:
        return f.read() == stamp


def run_cached(argvs, out, stamp, log=print, shown=lambda argv: " ".join(argv)):
    """Runs `argvs` (full argv lists) in order, each in its own process (output appended to out + '.log'),
    unless `is_cached(out, stamp)`; then records `stamp` beside `out`. Returns the seconds the commands took,
    or None when `out` was cached. A command that fails raises subprocess.CalledProcessError; its `out` stays
    unstamped, so the next run repeats it (a training run resumes from its last complete round)."""
    if is_cached(out, stamp):
        return None
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    start = time.perf_counter()
    with open(out + ".log", "a") as log_file:  # never a pipe: TFF's worker can keep one open
        for argv in argvs:
            log(shown(argv))
            subprocess.run(
                argv, cwd=common.REPO_ROOT, env=child_env(), stdout=log_file, stderr=subprocess.STDOUT, check=True
            )
    seconds = time.perf_counter() - start
    with atomic_write(stamp_path(out), binary=False) as f:
        f.write(stamp)
    return seconds


# -- tabulation: records -> rows -> results/<name>.json + .md -----------------------------------------------
def publish(name, payload, duration_s, source, results_dir=None):
    """Writes results/<name>.json (the envelope around `payload`, `common.write_result`) and from it its page
    results/<name>.md; returns both paths. Refuses (RuntimeError, nothing written) when the published JSON holds
    results scored over more images than `payload` (`dropped_results`): `source`, the records it was made
    from, lacks some; restore them, rerun them, or delete the JSON."""
    dropped = dropped_results(name, payload, results_dir)
    if dropped:
        more = f"; and {len(dropped) - 1} more" if len(dropped) > 1 else ""
        raise RuntimeError(
            f"{source} lacks what results/{name}.json was made from ({dropped[0]}{more}); "
            f"not rewriting it: restore {source}, rerun them, or delete results/{name}.json"
        )
    path = common.write_result(name, payload, quick=False, results_dir=results_dir, duration_s=duration_s)
    markdown = os.path.splitext(path)[0] + ".md"
    with open(path) as f:
        tables.write_markdown(markdown, name, json.load(f))
    return path, markdown


def dropped_results(name, payload, results_dir=None):
    """The results in results/<name>.json scored over more images (a result: a dict with an integer `n`) than
    in `payload`, which lacks them or has fewer: ["path: n images, now m"]."""
    path = common.result_path(name, results_dir)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        previous = dict(_counted(json.load(f)["results"]))
    now = dict(_counted(payload["results"]))
    return [f"{'/'.join(key)}: {n} images, now {now.get(key, 0)}" for key, n in previous.items() if now.get(key, 0) < n]


def _counted(tree, path=()):
    if isinstance(tree, dict):
        if isinstance(tree.get("n"), int):
            yield path, tree["n"]
            return
        for key, value in tree.items():
            yield from _counted(value, (*path, str(key)))
