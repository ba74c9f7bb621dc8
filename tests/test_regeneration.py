"""The committed tables regenerate identically from the committed records, through the engine's one tabulation path
(`experiments.cells.publish`): regimes and regimes_heldout from results/regimes_cells/ and
results/regimes_heldout_cells/, rounds from results/rounds_cells/, the frontier from the published studies and
results/frontier_cells/, the candidates' page from results/candidates.json (its per-image records live
under runs/candidates/, not in the repository). Only the provenance line (command, commit, date, machine) may
differ."""

import json
import os

import pytest

from experiments import cells
from experiments.perf import dlg_speed, keylock_overhead
from experiments.report import document, tables
from experiments.studies import frontier, key_table, regimes, rounds, table1
from experiments.studies.regimes import table as regimes_table
from tfkl import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")
PROVENANCE = "Command: `"


def _lines(text):
    return [line for line in text.splitlines() if not line.startswith(PROVENANCE)]


def _close(a, b, path="", rel=1e-5):
    """`a` equals `b` but for floats within `rel` of each other: the label floors' SSIMs are float32 sums whose
    last digits move with the CPU that computes them (the committed JSONs were tabulated on another machine)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), path
        for key in a:
            _close(a[key], b[key], f"{path}/{key}", rel)
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}/{i}", rel)
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-12), path
    else:
        assert a == b, path


def _committed(name, suffix):
    with open(os.path.join(RESULTS, f"{name}.{suffix}")) as f:
        return f.read()


def _assert_regenerates(name, payload, records, tmp_path):
    """`payload` published through the engine's path equals results/<name>.json and .md (but the provenance)."""
    path, page = cells.publish(name, payload, 0.0, records, results_dir=str(tmp_path))
    assert _lines(open(page).read()) == _lines(_committed(name, "md"))
    committed, regenerated = json.loads(_committed(name, "json")), json.load(open(path))
    for key in ("settings", "results", "tables", "headline", "notes"):
        _close(regenerated[key], committed[key], key)


@pytest.fixture(scope="module")
def fashion_mnist():
    try:
        data.load("fashion_mnist")
    except data.DataUnavailableError as e:
        pytest.skip(f"the label floors need Fashion-MNIST (make data): {e}")


@pytest.mark.parametrize(
    "name, records, seeds",
    [("regimes", "regimes_cells", [0, 1, 2]), ("regimes_heldout", "regimes_heldout_cells", [5, 6])],
)
def test_regimes_tables_regenerate_from_the_committed_records(name, records, seeds, fashion_mnist, tmp_path):
    store = regimes.Store(os.path.join(RESULTS, records), str(tmp_path / "work"))
    lines = []
    pooled = regimes_table.published_pooled(RESULTS) if name == "regimes" else None
    payload = regimes_table.tabulate(
        store, list(regimes.REGIMES.values()), seeds, regimes.THREAT_ORDER, log=lines.append, pooled=pooled
    )
    _assert_regenerates(name, payload, store.records, tmp_path)
    assert lines == [] and not os.path.exists(store.work)  # records alone: no grid, nothing written beside them


@pytest.mark.parametrize("name", ["candidates", "adaptive_attacker", "ablations"])
def test_a_studys_page_regenerates_from_its_committed_json(name, tmp_path):
    page = tmp_path / f"{name}.md"
    tables.write_markdown(str(page), name, json.loads(_committed(name, "json")))
    assert page.read_text() == _committed(name, "md")


def test_the_rounds_study_regenerates_from_its_committed_records(tmp_path):
    payload = rounds.tabulate(os.path.join(RESULTS, "rounds_cells"))
    _assert_regenerates("rounds", payload, "results/rounds_cells", tmp_path)


def test_the_frontier_regenerates_from_the_committed_results_and_its_records(tmp_path):
    payload = frontier.tabulate(os.path.join(RESULTS, "frontier_cells"))
    _assert_regenerates("frontier", payload, "results/frontier_cells", tmp_path)


def test_the_key_table_page_regenerates_from_its_committed_json():
    assert key_table.markdown(json.loads(_committed("key_table", "json"))) == _committed("key_table", "md")


def test_the_key_table_regenerates_from_its_committed_per_run_rows():
    """results/key_table.json keeps every run's evaluation row (results.per_run): the table, its figures and its
    headline are made from them alone."""
    doc = json.loads(_committed("key_table", "json"))
    settings, results = doc["settings"], doc["results"]
    setting = {k: settings[k] for k in ("model", "dataset", "rounds", "recovery_steps")}
    setting["public_sizes"] = tuple(settings["public_sizes"])
    rows = {name: {int(seed): row for seed, row in runs.items()} for name, runs in results["per_run"].items()}
    names, seconds = list(settings["configurations"]), results["median_round_seconds"]
    payload = key_table.payload(setting, settings["seeds"], names, rows, seconds, results["missing"], settings["quick"])
    for key in ("settings", "results", "tables", "headline"):
        assert json.loads(json.dumps(payload[key])) == doc[key], key


def test_table1_regenerates_from_its_committed_results():
    """results/table1.json keeps every run's figures (results: per setting and seed): its tables come from them."""
    doc = json.loads(_committed("table1", "json"))
    payload = table1._payload(doc["settings"]["settings"], doc["results"], doc["settings"]["quick"])
    for key in ("settings", "results", "tables", "headline", "notes"):
        assert json.loads(json.dumps(payload[key])) == doc[key], key


def test_dlg_speed_regenerates_from_its_committed_measurements():
    doc = json.loads(_committed("dlg_speed", "json"))
    results = doc["results"]
    payload = dlg_speed.payload(doc["settings"], results["reference"]["per_image"], results["ours"])
    for key in ("settings", "results", "tables", "headline", "notes"):
        assert json.loads(json.dumps(payload[key])) == doc[key], key


def test_keylock_overhead_regenerates_from_its_committed_measurements():
    doc = json.loads(_committed("keylock_overhead", "json"))
    payload = keylock_overhead.payload(doc["settings"], doc["results"])
    for key in ("settings", "results", "tables", "headline", "notes"):
        assert json.loads(json.dumps(payload[key])) == doc[key], key


def test_the_report_is_the_one_its_generator_writes_from_the_committed_results():
    docs = os.path.join(ROOT, "docs")
    with open(os.path.join(docs, "REPORT.md")) as f:
        assert document.render_report(RESULTS, docs) == f.read(), "rerun `make report`"
