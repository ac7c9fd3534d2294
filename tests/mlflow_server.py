"""A real `mlflow server` for the tests that need one (the UI tour, the tracking outage) and for
benchmarks/mlflow_ui_screens.py: the one place that starts it. Tests get it through the `mlflow_server`
fixture (tests/conftest.py), which marks them slow and stops whatever they left running."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server --workers 1` on a store, on a free loopback port that it keeps when stopped and started
    again (an outage); the UI is served by the same process. `with MlflowServer(uri) as server:` starts it."""

    def __init__(
        self, backend_store_uri: str, *, artifacts_destination: Path | None = None, log: Path | None = None
    ) -> None:
        self.backend_store_uri, self.artifacts_destination, self.log = backend_store_uri, artifacts_destination, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.start_s = 0.0  # how long the last start took, until /health answered

    def start(self, timeout: float = 180) -> MlflowServer:
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(mlflow) if mlflow.exists() else "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        if self.artifacts_destination is not None:
            cmd += ["--artifacts-destination", str(self.artifacts_destination)]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        t0 = time.monotonic()
        with open(self.log or os.devnull, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                log = f"; see {self.log}" if self.log else ""
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}{log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.start_s = time.monotonic() - t0
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop(kill=True)
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s")

    def stop(self, kill: bool = False) -> None:
        """Stop the server and its uvicorn worker: SIGTERM, then SIGKILL after 3 s (uvicorn's graceful shutdown
        waits for idle keep-alive connections); `kill`: SIGKILL at once, as a crash or an outage would."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=30 if kill else 3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # it only served reads: nothing to lose
                self.proc.wait(timeout=20)
        self.proc = None

    def __enter__(self) -> MlflowServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
