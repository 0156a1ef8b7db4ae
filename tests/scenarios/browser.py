"""The served page driven in headless Chromium over the DevTools protocol, as a user drives it.

:func:`drop_image` opens the page, waits until it has read the model's metadata, runs an optional setup script
(a token, a trap for ``alert``), drops one image file on the drop zone (dragenter, dragover, drop at its
centre) and returns the page's state once it answered, with a handle to read more from the page.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

__all__ = ["CHROMIUM_FLAGS", "DevTools", "chromium_or_skip", "drop_image"]

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")  # fmt: skip


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page target's websocket: synchronous calls."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._next = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        self._ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:  # events arrive interleaved with answers; the answer carries our id
            message = json.loads(self._ws.recv(timeout=30))
            if message.get("id") == self._next:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, deadline: float) -> Any:
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"the page never satisfied {expression}")


def chromium_or_skip() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    return chromium


def _page_target(profile: Path, deadline: float) -> str:
    """The websocket URL of the browser's page, once Chromium wrote its DevTools port."""
    port_file = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            port = int(port_file.read_text().split()[0])
            try:
                targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            except requests.RequestException:
                targets = []
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
        time.sleep(0.2)
    raise TimeoutError("Chromium did not open its DevTools port")


@contextlib.contextmanager
def _browser(url: str, profile: Path) -> Iterator[subprocess.Popen[bytes]]:
    command = [chromium_or_skip(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", url]
    browser = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield browser
    finally:  # stopped by its handle
        browser.terminate()
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait(timeout=10)


@contextlib.contextmanager
def drop_image(url: str, image: Path, profile: Path, setup_js: str = "", timeout_s: float = 90) -> Iterator[tuple[str, DevTools]]:
    """The page at ``url`` after ``image`` was dropped on it: its final state ("done" or "error") and the page."""
    from websockets.sync.client import connect  # comes with ray[serve] (uvicorn[standard])

    deadline = time.monotonic() + timeout_s
    with _browser(f"{url}/", profile), connect(_page_target(profile, deadline), max_size=None, open_timeout=10) as ws:
        page = DevTools(ws)
        page.wait_for("document.readyState === 'complete' && document.querySelector('#model small') !== null", deadline)
        if setup_js:
            page.evaluate(setup_js)
        x, y = page.evaluate("(r => [r.x + r.width / 2, r.y + r.height / 2])"
                             "(document.querySelector('#drop').getBoundingClientRect())")  # fmt: skip
        data = {"items": [], "files": [str(image)], "dragOperationsMask": 1}
        for kind in ("dragEnter", "dragOver", "drop"):
            page.call("Input.dispatchDragEvent", type=kind, x=x, y=y, data=data)
        state = page.wait_for("['done', 'error'].includes(document.querySelector('#status').dataset.state)"
                              " && document.querySelector('#status').dataset.state", deadline)  # fmt: skip
        yield str(state), page
