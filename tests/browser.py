"""Headless Chromium for the tests (the MLflow UI's pages, the HTML report) and benchmarks/mlflow_ui_screens.py.

The browser is Debian's Chromium (`apt-get install chromium`), driven with Playwright's Python client and
launched with `executable_path`: no browser download (`playwright install` is never run). Playwright rather
than Selenium because it needs nothing beyond a pip package (its driver ships inside the wheel; Selenium needs
Debian's chromium-driver besides, one more apt step in CI and on every developer's machine), and because it
reports what these tests check without extra plumbing: every console message and uncaught exception of a page
as events, each network request's start and end (the `quiet` wait), and clicks that wait until their target is
visible, stable and not covered (MLflow's tree rows still move while a folder opens).

Playwright's sync API runs an event loop of its own while it is started, and `asyncio.run` fails in that
thread meanwhile: a browser lives inside one `with launch() as browser:` block, never across tests.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Browser, ConsoleMessage, Request, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import TimeoutError as PlaywrightTimeout

# On a machine without network, maybe as root: no GPU, no QUIC, no background connections to Google's hosts
# (Playwright adds --no-sandbox, --disable-background-networking, --disable-component-update, ... itself).
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--hide-scrollbars"]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise RuntimeError("headless Chromium is needed: apt-get install -y chromium")


@contextlib.contextmanager
def launch(chromium: str | None = None) -> Iterator[Browser]:
    """One headless Chromium (Debian's, or the executable given), closed when the block ends."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium or find_chromium(), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def has_text(*needles: str) -> str:
    """A JS expression: does the page's text hold every needle?"""
    return f"{json.dumps(needles)}.every(n => (document.body ? document.body.innerText : '').includes(n))"


def _line(msg: ConsoleMessage) -> str:
    """A console message as one line. A failed load's message names no resource: its URL is added."""
    line = f"console.{msg.type}: {msg.text}"
    url = msg.location.get("url") if msg.location else None
    return f"{line} ({url})" if url and msg.text.startswith("Failed to load resource") else line


class Tab:
    """A page in its own browser context (a fresh profile): navigate, wait for text, click, type, read,
    screenshot, and the console lines and API calls (fetch or XHR) of the page since it was navigated to."""

    def __init__(self, browser: Browser, width: int = 1920, height: int = 1080) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
        self.page = self.context.new_page()
        self._console: list[tuple[str, str]] = []  # (level, line), since the last errors() or console()
        self._pending: set[Request] = set()
        self._last_change = time.monotonic()
        self.page.on("console", lambda m: self._console.append((m.type, _line(m))))
        self.page.on("pageerror", lambda e: self._console.append(("error", f"uncaught: {_error_text(e)}")))
        self.page.on("request", self._started)
        self.page.on("requestfinished", self._ended)
        self.page.on("requestfailed", self._ended)

    def _started(self, request: Request) -> None:
        if request.resource_type in ("fetch", "xhr"):
            self._pending.add(request)
            self._last_change = time.monotonic()

    def _ended(self, request: Request) -> None:
        if request in self._pending:
            self._pending.discard(request)
            self._last_change = time.monotonic()

    def goto(self, url: str) -> None:
        """Navigate and wait for the document's load event (an SPA renders after it: wait_for what it shows)."""
        self._pending.clear()
        self._last_change = time.monotonic()
        self.page.goto(url)

    def js(self, expression: str):
        try:
            return self.page.evaluate(expression)
        except PlaywrightError as e:
            raise RuntimeError(f"{expression[:80]}...: {e.message.splitlines()[0]}") from None

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, expression: str, what: str, timeout: float = 60) -> object:
        """Poll a JS expression until it is truthy; its value, or TimeoutError naming `what` and the page's text."""
        try:
            return self.page.wait_for_function(expression, polling=250, timeout=timeout * 1000).json_value()
        except PlaywrightTimeout:
            raise TimeoutError(
                f"{what}: not shown within {timeout:.0f} s. The page shows:\n{self.text()[:3000]}"
            ) from None

    def wait_text(self, *needles: str, timeout: float = 60) -> str:
        self.wait_for(has_text(*needles), f"text {needles}", timeout)
        return self.text()

    def quiet(self, idle_s: float = 1.0, timeout: float = 30) -> bool:
        """Wait until no API call (fetch or XHR) of this page has been in flight for idle_s: True, or False after
        timeout. Scripts, styles and images are left out: only the SPA's data calls decide what it shows."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._pending and time.monotonic() - self._last_change >= idle_s:
                return True
            self.page.wait_for_timeout(100)  # Playwright delivers the request events while it waits
        return False

    def visible(self, css: str) -> bool:
        """Whether the first element matching css is shown now (no waiting)."""
        return self.page.locator(css).first.is_visible()

    def click(self, css: str, text: str | None = None, nth: int = 0, timeout: float = 30) -> None:
        """Click the nth element matching css (and whose trimmed text is `text`), as a mouse would, once it is
        visible, stable and not covered; RuntimeError naming it when that does not happen within timeout."""
        try:
            self._locator(css, text).nth(nth).click(timeout=timeout * 1000)
        except PlaywrightError as e:
            desc = css + (f" with text {text!r}" if text is not None else "")
            raise RuntimeError(f"click target {desc}: {e.message.splitlines()[0]}") from None

    def _locator(self, css: str, text: str | None):
        loc = self.page.locator(css)
        return loc if text is None else loc.filter(has_text=re.compile(rf"^\s*{re.escape(text)}\s*$"))

    def type(self, text: str) -> None:
        self.page.keyboard.insert_text(text)

    def key(self, key: str) -> None:
        self.page.keyboard.press(key)

    def screenshot(self, path: Path) -> Path:
        self.page.screenshot(path=path)
        return path

    def console(self) -> list[str]:
        """Every console line (any level) and uncaught exception since the last console() or errors()."""
        lines, self._console = [line for _, line in self._console], []
        return lines

    def errors(self) -> list[str]:
        """Error-level console lines and uncaught exceptions since the last errors() or console()."""
        lines, self._console = [line for level, line in self._console if level in ("error", "assert")], []
        return lines


def _error_text(e: Exception) -> str:
    name, message = getattr(e, "name", "") or type(e).__name__, getattr(e, "message", "") or str(e)
    return f"{name}: {message}".splitlines()[0]
