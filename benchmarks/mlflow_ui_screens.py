"""A sweep in the MLflow UI, seen through headless Chromium: the pages a user opens, as PNG screenshots.

    PYTHONPATH=. python benchmarks/mlflow_ui_screens.py --tracking-uri sqlite:////abs/mlflow.db --sweep smoke shots/

starts `mlflow server --workers 1` on that store (or uses `--url` of a running one), walks the experiment's
runs table in model-training mode (sweep expanded; Description, lr and batch_size columns ticked in the column
picker, as a user would), the compare view, the Models tab, a trial's page, the sweep run's page and its
artifacts, and saves one PNG per page into the folder given.

The tour, the browser and the server are the tests' own (tests/mlflow_ui.py, tests/browser.py: Debian's
Chromium driven with Playwright; tests/mlflow_server.py), so this shows what tests/test_mlflow_ui.py checks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tests.mlflow_server import MlflowServer
from tests.mlflow_ui import tour


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
    server = MlflowServer(a.tracking_uri, log=a.out / "mlflow-server.log").start() if a.tracking_uri else None
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
