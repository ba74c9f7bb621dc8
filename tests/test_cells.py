"""experiments.cells: the record store (atomic records, resume), the process pool, cached commands, publishing."""

import json
import os
import sys
import threading
import time

import numpy as np
import pytest

from experiments import cells, common

CELL = cells.Cell("study", "G8", "none", "ig", 0)


def _store(tmp_path, **options):
    return cells.RecordStore(str(tmp_path), lambda c: os.path.join(c.regime, f"seed{c.seed}", c.threat), **options)


def test_a_record_is_stored_whole_and_marks_its_unit_done(tmp_path):
    store = _store(tmp_path)
    assert store.pending(CELL, range(3)) == [0, 1, 2] and store.load(CELL, range(3)) == {}
    path = store.write(CELL, 1, {"ssim": np.float32(0.5), "labels": np.arange(2)})
    assert path == os.path.join(str(tmp_path), "G8", "seed0", "none", "client_01.json")
    assert store.read(CELL, 1) == {"ssim": 0.5, "labels": [0, 1]}
    assert store.pending(CELL, range(3)) == [0, 2] and list(store.load(CELL, range(3))) == [1]
    assert os.listdir(os.path.dirname(path)) == ["client_01.json"]  # no temporary file left behind
    assert not store.complete(CELL, range(3)) and store.complete(CELL, [1])


def test_a_write_that_fails_leaves_no_record(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(TypeError):
        store.write(CELL, 0, {"not json": object()})
    assert store.pending(CELL, [0]) == [0] and os.listdir(store.cell_dir(CELL)) == []


def test_the_record_format_is_the_stores(tmp_path):
    store = _store(tmp_path, record_name="{:03d}.json", indent=2, trailing_newline=True)
    path = store.write(CELL, 7, {"a": 1})
    assert os.path.basename(path) == "007.json" and open(path).read() == '{\n  "a": 1\n}\n'


def test_pending_units_are_attacked_in_chunks_and_each_record_kept_as_it_comes(tmp_path):
    store, calls = _store(tmp_path), []
    store.write(CELL, 1, {"done": "before"})

    def attack(units):
        calls.append(list(units))
        for unit in units:
            if unit == 4:
                raise KeyboardInterrupt  # killed while attacking unit 4
            yield unit, {"unit": unit}

    with pytest.raises(KeyboardInterrupt):
        cells.run_pending(store, CELL, range(6), attack, chunk_size=2, log=lambda line: None)
    assert calls == [[0, 2], [3, 4]] and store.pending(CELL, range(6)) == [4, 5]
    assert store.read(CELL, 1) == {"done": "before"} and store.read(CELL, 3) == {"unit": 3}
    calls.clear()
    attacked = cells.run_pending(store, CELL, range(6), lambda us: ((u, {"u": u}) for u in us), log=lambda line: None)
    assert attacked == [4, 5] and store.complete(CELL, range(6))
    assert cells.run_pending(store, CELL, range(6), attack) == [] and calls == []


def test_a_cell_job_is_done_once_every_cell_it_attacks_holds_every_unit(tmp_path):
    store, other = _store(tmp_path), cells.Cell("study", "G8", "none", "grnn", 1)
    job = cells.cell_job(store, CELL, [0, 1], ["true"], str(tmp_path / "log"), also=[other])
    assert job.name == str(CELL) and job.cell == CELL and job.env["PYTHONPATH"] == common.REPO_ROOT
    for cell, unit in [(CELL, 0), (CELL, 1), (other, 0)]:
        store.write(cell, unit, {})
        assert not job.done()
    store.write(other, 1, {})
    assert job.done()


def _job(tmp_path, name, code=0, done=lambda: False):
    command = [sys.executable, "-c", f"import time, sys; time.sleep(0.3); print('{name}'); sys.exit({code})"]
    return cells.Job(name, command, str(tmp_path / f"{name}.log"), done)


def test_the_pool_runs_at_most_workers_processes_and_raises_the_first_failure_once_all_ended(tmp_path, monkeypatch):
    running, most, finished, lock = set(), [0], [], threading.Lock()
    launch = cells.launch

    def counting_launch(job):
        with lock:
            running.add(job.name)
            most[0] = max(most[0], len(running))
        code = launch(job)
        with lock:
            running.discard(job.name)
            finished.append(job.name)
        return code

    monkeypatch.setattr(cells, "launch", counting_launch)
    jobs = [_job(tmp_path, f"job{i}", code=int(i in (1, 3))) for i in range(5)]
    with pytest.raises(RuntimeError, match=r"job1 failed \(exit 1\); see .*job1.log"):
        cells.run_jobs(jobs, workers=2, log=lambda line: None)
    assert most[0] == 2 and sorted(finished) == [f"job{i}" for i in range(5)]  # the others ran to their end
    assert open(tmp_path / "job4.log").read() == "job4\n"


def test_the_pool_resumes_skipping_jobs_that_are_done(tmp_path):
    lines = []
    cells.run_jobs([_job(tmp_path, "a", done=lambda: True), _job(tmp_path, "b")], log=lines.append)
    assert lines == ["== b"] and not os.path.exists(tmp_path / "a.log")


def test_the_default_pool_is_two_workers():
    assert cells.DEFAULT_WORKERS == 2


def test_a_cached_command_runs_once_per_stamp(tmp_path):
    out = str(tmp_path / "run" / "out.json")
    argv = [sys.executable, "-c", f"import json; json.dump({{'n': 1}}, open({out!r}, 'w'))"]
    lines = []
    assert cells.run_cached([argv], out, "stamp 1", lines.append) is not None  # ran: its seconds
    assert json.load(open(out)) == {"n": 1} and cells.is_cached(out, "stamp 1") and len(lines) == 1
    assert cells.run_cached([argv], out, "stamp 1", lines.append) is None and len(lines) == 1  # cached
    assert not cells.is_cached(out, "stamp 2")
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(Exception, match="exit status 3"):
        cells.run_cached([failing], out, "stamp 2", lines.append)
    assert not cells.is_cached(out, "stamp 2") and cells.is_cached(out, "stamp 1")  # the failure stamped nothing


def test_publish_writes_the_json_and_its_page_and_refuses_to_drop_results(tmp_path):
    summary = {"n": 8, "success": {"ssim": {"rate": 0.5}}}
    payload = dict(results={"U8": {"none": summary}}, tables=[dict(title="T", columns=["a"], rows=[[1]])])
    path, markdown = cells.publish("bench", payload, 1.0, "records", results_dir=str(tmp_path))
    assert json.load(open(path))["results"] == payload["results"] and "**T**" in open(markdown).read()
    fewer = dict(payload, results={"U8": {"none": dict(summary, n=4)}})
    with pytest.raises(RuntimeError, match="records lacks what results/bench.json was made from"):
        cells.publish("bench", fewer, 1.0, "records", results_dir=str(tmp_path))
    assert json.load(open(path))["results"] == payload["results"]  # nothing written
    more = dict(payload, results={"U8": {"none": dict(summary, n=9)}, "G8": {"none": summary}})
    cells.publish("bench", more, 1.0, "records", results_dir=str(tmp_path))
    assert common.load_results(str(tmp_path))["bench"]["results"]["U8"]["none"]["n"] == 9


def test_a_cell_names_itself():
    assert str(CELL) == "study:G8/ig/0/none" and str(cells.Cell("c", "paper", None, "grnn", 2)) == "c:paper/grnn/2/-"


def test_jobs_run_in_the_order_given_when_one_worker(tmp_path):
    order = []
    jobs = [
        cells.Job(str(i), [sys.executable, "-c", "pass"], str(tmp_path / "log"), lambda i=i: order.append(i) or False)
        for i in range(4)
    ]
    start = time.perf_counter()
    cells.run_jobs(jobs, workers=1, log=lambda line: None)
    assert order == [0, 1, 2, 3] and time.perf_counter() - start < 60
