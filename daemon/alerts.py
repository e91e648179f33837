"""Budget alerts beyond the log and the live feed: a desktop notification where `notify-send`
(Linux) or `osascript` (macOS) exists, and the optional `[budgets] webhook`.

The supervisor hands the worker's alert events here (the worker runs as the service user, with
no desktop session). Each is delivered on a short-lived thread, best effort: it never blocks
the supervisor, a failure is one log line, and at most MAX_BUSY deliveries run at once (more
are dropped, with a line). The webhook gets the alert event as JSON, over https only, with a
bounded timeout; the event names budgets, never secrets.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
import urllib.request
from collections.abc import Iterable
from typing import Any

from llmtap.platform.runner import Runner, SubprocessRunner

log = logging.getLogger(__name__)

TIMEOUT_S = 5.0
MAX_BUSY = 4
_busy = threading.BoundedSemaphore(MAX_BUSY)


def deliver(events: Iterable[dict[str, Any]], webhook: str = "",
            runner: Runner | None = None) -> None:
    """Starts the delivery of each alert among `events` (other events are ignored)."""
    for event in events:
        if event.get("type") != "alert":
            continue
        if not _busy.acquire(blocking=False):
            log.warning("alert not delivered (too many under way): %s", event.get("message"))
            continue
        thread = threading.Thread(target=_deliver_one, args=(event, webhook, runner),
                                  name="llmtap-alert", daemon=True)
        thread.start()


def _deliver_one(event: dict[str, Any], webhook: str, runner: Runner | None) -> None:
    try:
        notify_desktop(str(event.get("message", "")), runner or SubprocessRunner(TIMEOUT_S))
        if webhook:
            post(webhook, event)
    except Exception as exc:  # best effort: one line, never a traceback
        log.warning("alert delivery failed: %s: %s", type(exc).__name__, exc)
    finally:
        _busy.release()


def desktop_command(message: str, platform: str = sys.platform) -> list[str] | None:
    """The notification command for this OS, if its tool is installed. The text is an argument,
    never part of a script."""
    if platform == "darwin" and shutil.which("osascript"):
        return ["osascript", "-e", "on run argv", "-e",
                'display notification (item 1 of argv) with title "llmtap"', "-e", "end run",
                message]
    if shutil.which("notify-send"):
        return ["notify-send", "--app-name=llmtap", "llmtap budget", message]
    return None


def notify_desktop(message: str, runner: Runner) -> None:
    argv = desktop_command(message)
    if argv is None:
        return
    done = runner(argv)
    if not done.ok:
        log.info("desktop notification not shown: %s", done.reason())


def post(url: str, event: dict[str, Any]) -> None:
    if not url.startswith("https://"):
        raise ValueError("the budgets webhook must be an https:// URL")
    body = json.dumps({"source": "llmtap", **event}).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"content-type": "application/json"})
    opener = urllib.request.build_opener(_NoRedirect)  # a redirect could leave https
    with opener.open(request, timeout=TIMEOUT_S) as reply:
        reply.read(1024)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
