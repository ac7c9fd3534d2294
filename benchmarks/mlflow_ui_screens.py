"""A sweep in the MLflow UI, seen through headless Chromium: the pages a user opens, as text and as PNG screenshots.

    python benchmarks/mlflow_ui_screens.py --tracking-uri sqlite:////abs/path/mlflow.db --sweep smoke shots/

starts `mlflow server --workers 1` on that store (or uses `--url` of a running one), walks the experiment's
runs table in model-training mode (sweep expanded; Description, lr and batch_size columns ticked in the column
picker, as a user would), the compare view, the Models tab, a trial's page, the sweep run's page and its
artifacts, and saves one PNG per page into the folder given. tests/test_mlflow_ui.py walks the same tour and
asserts on what each page shows.

The browser is Debian's Chromium (/usr/bin/chromium), driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: JSON messages ending in NUL on file descriptors 3 and 4), so nothing beyond the
standard library is needed: no websocket client, no Playwright, no browser download. The SPA is waited for by
polling the rendered text for what the page must show, then for the network to go quiet; console messages
of level error (console.error, uncaught exceptions, and Chromium's own log: failed loads, CSP, ...) are
collected for each page.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# As root, on a machine without network: no sandbox, no GPU, and no background connections to Google's hosts.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise RuntimeError("headless Chromium is needed: apt-get install -y chromium")


class DevTools:
    """One headless Chromium and its DevTools connection over a pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, profile: Path, chromium: str | None = None, log: Path | None = None) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        args = [chromium or find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"]
        # The shell hands our stdin/stdout pipes to Chromium as fds 3/4, with no fd-number juggling in Python.
        with open(log or os.devnull, "wb") as err:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 </dev/null >&2', *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
                env={**os.environ, "HOME": str(profile)},
            )
        self._cv = threading.Condition()
        self._replies: dict[int, dict] = {}
        self._events: list[dict] = []
        self._next = 0
        self._closed = False
        threading.Thread(target=self._read, daemon=True).start()
        self.version = self.call("Browser.getVersion", timeout=60)["product"]

    def _read(self) -> None:
        buf = b""
        while chunk := self.proc.stdout.read1(1 << 20):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            with self._cv:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self._events.append(msg)
                self._cv.notify_all()
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        with self._cv:
            self._next += 1
            i = self._next
        msg = {"id": i, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        self.proc.stdin.write(json.dumps(msg).encode() + b"\0")
        self.proc.stdin.flush()
        with self._cv:
            if not self._cv.wait_for(lambda: i in self._replies or self._closed, timeout):
                raise TimeoutError(f"Chromium did not answer {method} within {timeout:.0f} s")
            if i not in self._replies:
                raise RuntimeError(f"Chromium exited before answering {method}")
            reply = self._replies.pop(i)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error'].get('message')}")
        return reply["result"]

    def events(self, session: str, start: int = 0) -> tuple[list[dict], int]:
        """A session's events from index start on, and the index after the last event seen."""
        with self._cv:
            return [e for e in self._events[start:] if e.get("sessionId") == session], len(self._events)

    def n_events(self) -> int:
        with self._cv:
            return len(self._events)

    def tab(self, width: int = 1920, height: int = 1080) -> Tab:
        return Tab(self, width, height)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)


def _arg(a: dict) -> str:
    """A console call's argument as DevTools describes it: strings as they are, other values as JSON."""
    if "value" in a:
        return a["value"] if isinstance(a["value"], str) else json.dumps(a["value"])
    return a.get("description", a["type"])


def _console_line(event: dict) -> str | None:
    """An error-level console message as one line, or None for anything below error."""
    method, p = event["method"], event["params"]
    if method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
        args = " ".join(_arg(a) for a in p["args"])
        return f"console.{p['type']}: {args}"
    if method == "Runtime.exceptionThrown":
        d = p["exceptionDetails"]
        return f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}".splitlines()[0]
    if method == "Log.entryAdded" and p["entry"]["level"] == "error":
        e = p["entry"]
        return f"{e['source']}: {e['text']}" + (f" ({e['url']})" if e.get("url") else "")
    return None


class Tab:
    """A page in the browser: navigate, wait for text, click like a mouse, type, read, screenshot."""

    def __init__(self, browser: DevTools, width: int, height: int) -> None:
        self.browser = browser
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._mark = self._nav_mark = browser.n_events()
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", metrics)

    def call(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        return self.browser.call(method, params, self.session, timeout)

    def goto(self, url: str) -> None:
        self._nav_mark = self.browser.n_events()
        self.call("Page.navigate", {"url": url})

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}...: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, expression: str, what: str, timeout: float = 60) -> object:
        """Poll a JS expression until it is truthy; its value, or TimeoutError naming `what` and the page's text."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.js(expression)
            except RuntimeError:  # a page between documents: no context to evaluate in yet
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not shown within {timeout:.0f} s. The page shows:\n{self.text()[:3000]}")
            time.sleep(0.25)

    def wait_text(self, *needles: str, timeout: float = 60) -> str:
        self.wait_for(has_text(*needles), f"text {needles}", timeout)
        return self.text()

    def quiet(self, idle_s: float = 1.0, timeout: float = 30) -> bool:
        """Wait until no API call (fetch or XHR) of this page has been in flight for idle_s: True, or False after
        timeout. Scripts are left out: a worker's script is fetched here but finishes in the worker's own session."""
        deadline = time.monotonic() + timeout
        last_change, pending, seen = time.monotonic(), set(), self._nav_mark
        while time.monotonic() < deadline:
            new, seen = self.browser.events(self.session, seen)
            for e in new:
                rid = e["params"].get("requestId")
                if e["method"] == "Network.requestWillBeSent" and e["params"].get("type") in ("Fetch", "XHR"):
                    pending.add(rid)
                elif e["method"] in ("Network.loadingFinished", "Network.loadingFailed") and rid in pending:
                    pending.discard(rid)
                else:
                    continue
                last_change = time.monotonic()
            if not pending and time.monotonic() - last_change >= idle_s:
                return True
            time.sleep(0.1)
        return False

    def box(self, css: str, text: str | None = None, nth: int = 0) -> list[float] | None:
        """The centre of the nth visible element matching css (and whose trimmed innerText is text), or None."""
        return self.js(self._box_js(css, text, nth))

    def click(self, css: str, text: str | None = None, nth: int = 0, timeout: float = 30) -> None:
        desc = css + (f" with text {text!r}" if text is not None else "")
        x, y = self.wait_for(self._box_js(css, text, nth), f"click target {desc}", timeout)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    @staticmethod
    def _box_js(css: str, text: str | None, nth: int) -> str:
        return f"""(() => {{
            const all = [...document.querySelectorAll({json.dumps(css)})]
                .filter(e => {json.dumps(text)} === null || e.innerText.trim() === {json.dumps(text)});
            const e = all[{nth}];
            if (!e) return null;
            e.scrollIntoView({{block: 'center', inline: 'center'}});
            const r = e.getBoundingClientRect();
            return r.width > 0 && r.height > 0 ? [r.x + r.width / 2, r.y + r.height / 2] : null;
        }})()"""

    def type(self, text: str) -> None:
        self.call("Input.insertText", {"text": text})

    def key(self, key: str, code: str, keycode: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent", {"type": kind, "key": key, "code": code, "windowsVirtualKeyCode": keycode}
            )

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"]))
        return path

    def errors(self) -> list[str]:
        """Error-level console lines since the last call (the first call: since the tab opened)."""
        events, self._mark = self.browser.events(self.session, self._mark)
        return [line for e in events if (line := _console_line(e)) is not None]


# --- the MLflow server ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server --workers 1` on a store, on a free loopback port; the UI is served by the same process."""

    def __init__(self, backend_store_uri: str, log: Path | None = None, timeout: float = 180) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(mlflow) if mlflow.exists() else "mlflow", "server", "--backend-store-uri", backend_store_uri,
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        t0 = time.monotonic()
        with open(log or os.devnull, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self.proc.returncode}" + (f"; see {log}" if log else "")
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.start_s = time.monotonic() - t0
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
            try:
                self.proc.wait(timeout=3)  # uvicorn's graceful shutdown waits for idle keep-alive connections
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # it only served reads: nothing to lose
                self.proc.wait(timeout=20)


# --- the tour ---------------------------------------------------------------------------------------------------

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


def has_text(*needles: str) -> str:
    """A JS expression: does the page's text hold every needle?"""
    return f"{json.dumps(needles)}.every(n => (document.body ? document.body.innerText : '').includes(n))"


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
    profile: Path | None = None,
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
    """
    pages: dict[str, Page] = {}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if profile is None:
            profile = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chromium-")))
        browser = DevTools(profile / "profile", log=profile / "chromium.log")
        stack.callback(browser.close)
        tab = browser.tab()

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
            if tab.box(ASSISTANT_CLOSE):  # MLflow 3's assistant panel opens beside the page; a user closes it
                tab.click(ASSISTANT_CLOSE)
            top = tab.js(ROWS_JS) or []
            found = {"top_level_rows": [run_name(r) for r in top]}
            found["sweep_href"] = next(h for r in top if run_name(r) == sweep for h in r["_links"] if "/runs/" in h)
            tab.click(f".ag-row:has(a[href='{found['sweep_href']}']) {EXPANDER}")
            tab.wait_for(f"{ROWS_JS}.length > {len(top)}", "the sweep's runs, expanded")
            tab.click("[data-testid=column-selection-dropdown]", text="Columns")
            for group, column in [("Attributes", "Description"), *(("Parameters", p) for p in params)]:
                tick_column(tab, group, column)
            tab.key("Escape", "Escape", 27)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for the PNG screenshots (created)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tracking-uri", help="a store to serve with `mlflow server --workers 1` (sqlite:////abs/path)")
    src.add_argument("--url", help="a running MLflow server, e.g. http://127.0.0.1:5000")
    ap.add_argument("--experiment", default="cifar10", help="experiment name (default: cifar10)")
    ap.add_argument("--sweep", required=True, help="the sweep's name (its run's name)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    server = MlflowServer(a.tracking_uri, log=a.out / "mlflow-server.log") if a.tracking_uri else None
    try:
        url = server.url if server else a.url.rstrip("/")
        if server:
            print(f"mlflow server up in {server.start_s:.1f} s at {url}")
        query = urllib.parse.urlencode({"experiment_name": a.experiment})
        with urllib.request.urlopen(f"{url}/ajax-api/2.0/mlflow/experiments/get-by-name?{query}") as r:
            experiment_id = json.load(r)["experiment"]["experiment_id"]
        pages = tour(url, experiment_id, a.sweep, out_dir=a.out)
    finally:
        if server:
            server.stop()
    for p in pages.values():
        print(f"{p.png}  {p.seconds:5.1f} s  {p.url}")
        if p.failure:
            print(f"    FAILED: {p.failure.splitlines()[0]}")
        for e in p.errors:
            print(f"    console error: {e.splitlines()[0]}")
    print(f"done in {time.monotonic() - t0:.0f} s")
    return 1 if any(p.failure for p in pages.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
