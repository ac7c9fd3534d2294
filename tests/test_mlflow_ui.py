"""The MLflow UI on a real sweep's store, as a user sees it (issue 12): a real smoke sweep with --register-model,
a real `mlflow server --workers 1` on its SQLite store, and Debian's headless Chromium driven with Playwright
(tests/mlflow_ui.py, tests/browser.py) through the runs table in model-training mode, the compare view, the
Models tab, a trial's page, the sweep run's page and its artifacts.

What each page must show is read from the store with MlflowClient, so the tests check that the UI shows what
the sweep logged, and that what it logged reads well (descriptions, datasets, the logged model).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REGISTERED_MODEL
from tests.mlflow_ui import run_name, tour

pytestmark = pytest.mark.slow  # and so by its fixtures (smoke_sweep, mlflow_server, chromium)

NOTE = "mlflow.note.content"
REGISTERED = REGISTERED_MODEL
HYPERPARAMETERS = ("lr", "batch_size")  # ticked in the runs table's column picker, as a user would

# Error-level console lines that MLflow 3.17's UI logs on any store, with nothing of this project in them.
# Everything else at level error fails test_no_console_errors; lines below error (AG Grid's deprecation
# warnings) are not collected.
ALLOWED_CONSOLE_ERRORS = {
    # At every page load the UI asks who is logged in. Only `mlflow server --app-name basic-auth` serves that
    # route; a plain server answers 404, which Chromium logs as a failed resource load (tests/browser.py adds
    # the resource's URL to the line).
    "users/current 404": re.compile(
        r"^console\.error: Failed to load resource: the server responded with a status of 404 \(Not Found\) "
        r"\(http://127\.0\.0\.1:\d+/ajax-api/2\.0/mlflow/users/current\)$"
    ),
    # The notice a browser raises when a ResizeObserver callback changes the layout it observes within one frame
    # (AG Grid re-measuring as the column picker adds columns, on the runs page only). It carries no error
    # object (hence the null), and MLflow's `window.onerror = (m, s, l, c, err) => console.error(err, m)`
    # logs every such event.
    "ResizeObserver notice": re.compile(
        r"^console\.error: null ResizeObserver loop completed with undelivered notifications\.$"
    ),
}


def squash(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def ui(smoke_sweep, mlflow_server, chromium) -> SimpleNamespace:
    tmp, r, uri = smoke_sweep.tmp, smoke_sweep.result, smoke_sweep.uri
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cifar10")
    runs = client.search_runs([exp.experiment_id], "tags.sweep = 'smoke'", max_results=100)
    parent = next(r for r in runs if r.data.tags.get("role") == "sweep")
    children = [r for r in runs if r.info.run_id != parent.info.run_id]
    with mlflow_server(uri, log=tmp / "mlflow-server.log") as server, chromium() as browser:
        pages = tour(server.url, exp.experiment_id, "smoke", tmp / "screens", browser, HYPERPARAMETERS)
    return SimpleNamespace(
        stdout=r.stdout, client=client, exp=exp, parent=parent, children=children, pages=pages, tmp=tmp
    )


def shown(ui, name: str):
    """The page, after checking that it showed what a page of its kind shows (its tour step did not fail)."""
    page = ui.pages.get(name)
    assert page is not None, f"the tour did not reach the {name} page: {sorted(ui.pages)}"
    assert page.failure is None, page.failure
    return page


def test_the_printed_url_opens_the_runs_table_in_model_training_mode(ui):
    exp_id = ui.exp.experiment_id
    assert f"#/experiments/{exp_id}/runs?workflowType=machine_learning" in ui.stdout
    assert f"#/experiments/{exp_id}/runs/{ui.parent.info.run_id}" in ui.stdout  # and the sweep run's page
    page = shown(ui, "runs")
    nav = page.text.split("Experiments")[0]  # the side bar, above the breadcrumb
    assert "Model registry" in nav and "Judges" not in nav and "Training runs" not in nav, nav
    assert "Run Name" in page.text and "matching runs" in page.text


def test_trials_are_listed_under_their_sweep_with_their_hyperparameters(ui):
    page = shown(ui, "runs")
    assert page.data["top_level_rows"] == ["smoke"]  # before expanding: the sweep alone, its runs nested in it
    rows = {run_name(r): r for r in page.rows}
    names = [run_name(r) for r in page.rows]
    assert names[0] == "smoke" and sorted(names[1:]) == sorted(c.info.run_name for c in ui.children), names
    roles = sorted(c.data.tags["role"] for c in ui.children)
    assert roles == ["baseline", "confirm", "trial", "trial", "trial"]  # --num-samples 3 beside --smoke-test
    sweep_row = rows["smoke"]
    for c in ui.children:
        row = rows[c.info.run_name]
        assert row["_x"] > sweep_row["_x"], "a trial's name is indented under its sweep"
        for p in HYPERPARAMETERS:
            assert row[p] == c.data.params[p], (c.info.run_name, p, row)
    # The sweep's own settings are `sweep.*` params: its row has no hyperparameter of its own.
    assert all(sweep_row[p] == "-" for p in HYPERPARAMETERS), sweep_row
    assert {"sweep.num_samples", "sweep.max_epochs"} <= set(ui.parent.data.params)


def test_descriptions_are_shown(ui):
    exp_note, parent_note = ui.exp.tags.get(NOTE, ""), ui.parent.data.tags.get(NOTE, "")
    # What they say: the task and its documented baseline; the headline of the sweep against that baseline.
    assert "CIFAR-10" in exp_note and re.search(r"\b61(\.0+)?%", exp_note), exp_note
    assert re.search(r"\bbest\b", parent_note, re.I) and re.search(r"\b61(\.0+)?%", parent_note), parent_note
    runs = shown(ui, "runs")
    assert squash(exp_note) in squash(runs.text)  # the experiment's description, above the runs table
    rows = {run_name(r): r for r in runs.rows}
    for run in [ui.parent, *ui.children]:
        note = run.data.tags.get(NOTE, "")
        assert note, f"{run.info.run_name} has no description"
        cell = rows[run.info.run_name]["Description"]
        assert note.startswith(cell.removesuffix("...")), (run.info.run_name, cell, note)
    assert squash(parent_note) in squash(shown(ui, "sweep").text)
    trial_page = shown(ui, "trial")
    trial = next(c for c in ui.children if c.info.run_id in trial_page.url)
    assert trial.data.tags["role"] == "trial"
    note = trial.data.tags.get(NOTE, "")
    assert squash(note) in squash(trial_page.text)
    # A trial's description: its config in one line, and its outcome.
    assert "\n" not in note and re.search(r"\blr [0-9]", note) and f"batch {trial.data.params['batch_size']}" in note
    assert re.search(r"val/acc \d+(\.\d+)?%", note), note


def test_datasets_are_shown(ui):
    runs = shown(ui, "runs")
    for run in [ui.parent, *ui.children]:
        inputs = run.inputs.dataset_inputs if run.inputs else []
        contexts = {t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context"}
        assert contexts == {"train", "val", "test"}, (run.info.run_name, contexts)
        train = next(i.dataset for i in inputs if any(t.value == "train" for t in i.tags))
        assert train.name.startswith("cifar10"), train.name
        cell = next(r for r in runs.rows if run_name(r) == run.info.run_name)["Dataset"]
        assert f"{train.name} ({train.digest})" in cell and "Train" in cell, cell
    trial = shown(ui, "trial")
    assert "Datasets" in trial.text and re.search(r"cifar10\S* \([0-9a-f]+\)\s+Train", trial.text), trial.text


def test_the_logged_model_is_listed(ui):
    models = ui.client.search_logged_models([ui.exp.experiment_id])
    assert len(models) == 1, models
    model = models[0]
    assert model.source_run_id == ui.parent.info.run_id
    runs = shown(ui, "runs")
    sweep_row = next(r for r in runs.rows if run_name(r) == "smoke")
    # Registered, the model shows as its registry version, linked to it.
    assert squash(sweep_row["Models"]) == f"{REGISTERED} v1", sweep_row
    assert f"#/models/{REGISTERED}/versions/1" in sweep_row["_links"], sweep_row
    assert all(r["Models"] == "-" for r in runs.rows if r is not sweep_row)  # only the best model, on the sweep
    tab = shown(ui, "models")
    row = next((r for r in tab.rows if r.get("Model name", "").split("\n")[-1] == model.name), None)
    assert row is not None, tab.rows
    assert row["Status"] == "Ready" and row["Source run"] == "smoke", row
    assert REGISTERED in row["Registered models"], row  # the logged model links its registered version
    page = shown(ui, "sweep")
    assert re.search(rf"Registered models\s+{REGISTERED}\s+v1", page.text), page.text


def test_the_sweep_runs_artifacts_are_listed(ui):
    page = shown(ui, "artifacts")
    expected = {Path(a.path).name for a in ui.client.list_artifacts(ui.parent.info.run_id)}
    assert {"best_config.json", "best_model", "report"} <= expected
    assert set(page.data["artifacts"]) == expected, page.data["artifacts"]
    report = shown(ui, "report")
    assert "report.md" in report.text and "Headline" in report.text, report.text[:2000]


def test_no_console_errors(ui):
    assert set(ui.pages) == {"runs", "compare", "models", "trial", "sweep", "artifacts", "report"}
    unexpected = {
        name: [e for e in page.errors if not any(p.match(e) for p in ALLOWED_CONSOLE_ERRORS.values())]
        for name, page in ui.pages.items()
    }
    assert unexpected == {name: [] for name in ui.pages}


def test_every_page_has_a_screenshot(ui):
    for page in ui.pages.values():
        head = page.png.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n", page.png
        assert struct.unpack(">II", head[16:24]) == (1920, 1080), page.png
        assert page.png.stat().st_size > 20_000, page.png  # a rendered page, not a blank one
