"""Headless Chromium driven over the DevTools protocol (a websocket): load a page, wait for a
condition in it, read the DOM, take a screenshot, and collect Content-Security-Policy violations.

Needs only Debian's `chromium` and the `websockets` package (in the test lock).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

# Collects CSP violations before any page script runs (DevTools scripts are exempt from the CSP).
WATCH_CSP = ("window.__csp = []; document.addEventListener('securitypolicyviolation', "
             "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, width: int = 1400, height: int = 1000) -> None:
        path = chromium_path()
        assert path, "chromium is missing: scripts/test.sh installs it"
        self.profile = tempfile.mkdtemp(prefix="llmtap-chromium-")
        self.proc = subprocess.Popen(
            [path, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.ws = connect(self._endpoint(), max_size=64 * 1024 * 1024)
        self._ids = itertools.count(1)
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=self.session)
        self.call("Runtime.enable", session=self.session)
        self.call("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH_CSP}, session=self.session)

    def _endpoint(self) -> str:
        assert self.proc.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if match := re.search(r"DevTools listening on (ws://\S+)", line):
                return match.group(1)
            if not line and self.proc.poll() is not None:
                break
        raise AssertionError("chromium did not start its DevTools endpoint")

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             ) -> dict[str, Any]:
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str, ready: str = "document.readyState === 'complete'", timeout: float = 20) -> None:
        self.call("Page.navigate", {"url": url}, session=self.session)
        self.wait(ready, timeout)

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                           session=self.session)
        return result.get("result", {}).get("value")

    def wait(self, expression: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(f"(() => {{ try {{ return {expression}; }} catch (e) {{ return null; }} }})()")
            if value:
                return value
            if time.monotonic() > deadline:
                where = self.eval("location.pathname")
                raise AssertionError(f"timed out waiting for {expression!r} on {where}")
            time.sleep(0.2)

    def html(self) -> str:
        return str(self.eval("document.documentElement.outerHTML"))

    def text(self) -> str:
        return str(self.eval("document.body ? document.body.innerText : ''"))

    def csp_violations(self) -> list[str]:
        return list(self.eval("window.__csp || []") or [])

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=self.session)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)
