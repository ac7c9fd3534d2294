"""A sweep in the MLflow UI as a user walks it, through headless Chromium (tests/browser.py): the pages a user
opens, as text, table rows, console errors and PNG screenshots. tests/test_mlflow_ui.py asserts on what each page
shows; benchmarks/mlflow_ui_screens.py saves the screenshots of a store of your own.

The SPA is waited for by polling the rendered text for what the page must show, then for its API calls to go
quiet; console messages of level error (console.error, uncaught exceptions, and Chromium's own log: failed
loads, CSP, ...) are collected for each page.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import Browser

from tests.browser import Tab, has_text, launch

# Rows of MLflow's runs table (AG Grid): cells of one row are split between the pinned and the scrolling part,
# and joined here by row index; each row maps a header's label to its cell's text, plus the run links it holds.
ROWS_JS = """(() => {
    const labels = {};
    for (const h of document.querySelectorAll('.ag-header-cell[col-id]'))
        labels[h.getAttribute('col-id')] = h.innerText.trim();
    const rows = {};
    for (const r of document.querySelectorAll('.ag-row[row-index]')) {
        const row = rows[r.getAttribute('row-index')] ??= {_top: r.getBoundingClientRect().top, _links: []};
        const run = r.querySelector('a[href*="/runs/"]');
        if (run) row._x = run.getBoundingClientRect().left;
        for (const c of r.querySelectorAll('.ag-cell[col-id]'))
            row[labels[c.getAttribute('col-id')] || c.getAttribute('col-id')] = c.innerText.trim();
        for (const a of r.querySelectorAll('a[href]')) row._links.push(a.getAttribute('href'));
    }
    return Object.values(rows).sort((a, b) => a._top - b._top);
})()"""


ASSISTANT_CLOSE = "[data-component-id='mlflow.assistant.chat_panel.close']"
EXPANDER = "[data-component-id$='runnamecellrenderer.tsx_46']"  # the +/- beside a parent run's name
ARTIFACTS_JS = (
    "[...document.querySelectorAll('[data-testid=artifact-tree-node]')].map(e => e.getAttribute('artifact-name'))"
)


def run_name(row: dict) -> str:
    """A runs-table row's run name (the cell also holds the run's colour, e.g. '#be501e')."""
    return row.get("Run Name", "").split("\n")[-1]


@dataclass
class Page:
    name: str
    url: str
    text: str = ""  # document.body.innerText once the page settled
    errors: list[str] = field(default_factory=list)  # error-level console lines
    rows: list[dict] = field(default_factory=list)  # the AG Grid table's rows, where the page has one
    data: dict = field(default_factory=dict)  # what the page's actions found (see tour)
    failure: str | None = None  # what the page did not show in time, or an action that failed
    png: Path | None = None
    seconds: float = 0.0


def tick_column(tab: Tab, group: str, name: str) -> None:
    """In the open column picker: search `name`, tick it under `group` (Attributes, Parameters, Metrics, ...)."""
    tab.click("input[placeholder='Search columns']")
    tab.js("document.querySelector(\"input[placeholder='Search columns']\").select()")
    tab.type(name)
    nodes = "[data-testid=column-selector-tree] .du-bois-light-tree-treenode:not([aria-hidden])"
    index = tab.wait_for(
        f"""(() => {{
            const n = [...document.querySelectorAll({json.dumps(nodes)})];
            const g = n.findIndex(e => e.innerText.trim().startsWith({json.dumps(group)}));
            const i = g < 0 ? -1 : n.findIndex((e, k) => k > g && e.innerText.trim() === {json.dumps(name)});
            return i < 0 ? null : i + 1;
        }})()""",
        f"column {group} > {name} in the column picker",
    )
    node = f"[...document.querySelectorAll({json.dumps(nodes)})][{index - 1}]"
    if not tab.js(f"{node}.className.includes('checkbox-checked')"):
        tab.click(f"{nodes} .du-bois-light-tree-checkbox", nth=index - 1)
        tab.wait_for(f"{node}.className.includes('checkbox-checked')", f"{group} > {name} ticked")


def tour(
    base_url: str,
    experiment_id: str,
    sweep: str,
    out_dir: Path | None = None,
    browser: Browser | None = None,
    params: tuple[str, ...] = ("lr", "batch_size"),
    timeout: float = 90,
) -> dict[str, Page]:
    """Walk a sweep's pages as a user would, each a fresh load of its URL in one browser profile:

    runs       the runs table in model-training mode; the sweep's row expanded; Description and `params`
               ticked in the column picker (data: top_level_rows, the run names before expanding)
    compare    the same table's chart view (compareRunsMode=CHART)
    models     the experiment's Models tab (logged models)
    trial      the first trial's page, by the link in the runs table
    sweep      the sweep run's page
    artifacts  the sweep run's artifacts (data: artifacts, the names in the tree)
    report     the same, with report/report.md opened, when there is a report

    A page that does not show what it should within `timeout` gets a `failure` and the tour goes on where it
    can; each page keeps its text, its table rows, its console errors and (with out_dir) a PNG screenshot.
    The pages open in one tab of `browser`, or of a Chromium launched for the tour and closed after it.
    """
    pages: dict[str, Page] = {}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        browser = stack.enter_context(launch()) if browser is None else browser
        tab = Tab(browser)
        stack.callback(tab.context.close)

        def visit(name: str, url: str, ready: str, then=None) -> Page:
            t0 = time.monotonic()
            page = pages[name] = Page(name, url)
            tab.goto("about:blank")
            tab.goto(url)
            try:
                tab.wait_for(ready, f"{name} page", timeout)
                if then:
                    page.data = then() or {}
            except (TimeoutError, RuntimeError, StopIteration) as e:
                page.failure = f"{type(e).__name__}: {e}"
            tab.quiet()
            page.text, page.rows, page.errors = tab.text(), tab.js(ROWS_JS) or [], tab.errors()
            if out_dir is not None:
                page.png = tab.screenshot(out_dir / f"{len(pages)}-{name}.png")
            page.seconds = time.monotonic() - t0
            return page

        def expand_and_pick_columns() -> dict:
            if tab.visible(ASSISTANT_CLOSE):  # MLflow 3's assistant panel opens beside the page; a user closes it
                tab.click(ASSISTANT_CLOSE)
            top = tab.js(ROWS_JS) or []
            found = {"top_level_rows": [run_name(r) for r in top]}
            found["sweep_href"] = next(h for r in top if run_name(r) == sweep for h in r["_links"] if "/runs/" in h)
            tab.click(f".ag-row:has(a[href='{found['sweep_href']}']) {EXPANDER}")
            tab.wait_for(f"{ROWS_JS}.length > {len(top)}", "the sweep's runs, expanded")
            tab.click("[data-testid=column-selection-dropdown]", text="Columns")
            for group, column in [("Attributes", "Description"), *(("Parameters", p) for p in params)]:
                tick_column(tab, group, column)
            tab.key("Escape")
            headers = "[...document.querySelectorAll('.ag-header-cell')].map(e => e.innerText.trim())"
            tab.wait_for(f"{json.dumps(params)}.every(p => {headers}.includes(p))", "the ticked columns")
            return found

        def open_report() -> dict:
            tab.click("[data-testid=artifact-tree-node][artifact-name=report]")
            # The folder opens with an animation: a click aimed while rows still move can land on the
            # row above (report.html). Click again until report.md's own preview shows.
            shows_md = "document.body.innerText.includes('report/report.md')"
            for attempt in range(4):
                tab.click("[data-testid=artifact-tree-node][artifact-name$='report.md']")
                try:
                    tab.wait_for(shows_md, "report.md's preview", timeout=10 if attempt < 3 else 30)
                    break
                except TimeoutError:
                    if attempt == 3:
                        raise
            return {"artifacts": tab.js(ARTIFACTS_JS)}

        ml = "workflowType=machine_learning"
        runs_url = f"{base_url}/#/experiments/{experiment_id}/runs?{ml}"
        runs = visit("runs", runs_url, has_text(sweep, "matching runs"), expand_and_pick_columns)
        visit("compare", f"{runs_url}&compareRunsMode=CHART", has_text(sweep, "Add chart"))
        any_row = "document.querySelector('.ag-row[row-index]')"
        visit("models", f"{base_url}/#/experiments/{experiment_id}/models?{ml}", f"!!{any_row}")
        # The run pages, in the model-training layout the sweep's printed URLs ask for (the runs table links
        # them without workflowType, and MLflow then lays them out for GenAI).
        trials = [h for r in runs.rows if run_name(r).startswith("trial-") for h in r["_links"] if "/runs/" in h]
        if trials:
            visit("trial", f"{base_url}/{trials[0]}?{ml}", has_text("Parameters", "About this run"))
        if sweep_href := runs.data.get("sweep_href"):
            visit("sweep", f"{base_url}/{sweep_href}?{ml}", has_text("About this run"))
            tree = "document.querySelector('[data-testid=artifact-tree-node]')"
            names = lambda: {"artifacts": tab.js(ARTIFACTS_JS)}  # noqa: E731
            artifacts = visit("artifacts", f"{base_url}/{sweep_href}/artifacts", f"!!{tree}", names)
            if "report" in artifacts.data.get("artifacts", []):
                visit("report", f"{base_url}/{sweep_href}/artifacts", f"!!{tree}", open_report)
    return pages
