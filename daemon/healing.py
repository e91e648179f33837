"""Self-healing: what the supervisor does when a part fails, and when it gives up.

A failure (the worker exited or stopped answering, the redirect helper died) is healed by an
attempt the supervisor passes in: lift the redirect at once, so traffic goes direct and nobody's
requests hang on a dead proxy, replace what failed, put the redirect back once it listens. An
attempt that fails is retried with backoff. Only repeated failure ends the daemon: more than
MAX_FAILURES in FAILURE_WINDOW_S, with a one-line reason. `status` shows the restarts and the
last reason.
"""

from __future__ import annotations

import collections
import datetime
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from llmtap.errors import LlmtapError, RuntimeFailure

log = logging.getLogger("llmtap")

HEARTBEAT_TIMEOUT_S = 2.0  # a worker that reports nothing for this long is hung
MAX_FAILURES = 5
FAILURE_WINDOW_S = 120.0
BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 4.0)  # before the n-th attempt within the window


class Healer:
    def __init__(self, stop: threading.Event, clock: Callable[[], float] = time.monotonic) -> None:
        self.stop = stop
        self.clock = clock
        self.failures: collections.deque[float] = collections.deque()
        self.restarts = 0
        self.last: dict[str, Any] | None = None
        self.healing = False

    def heal(self, reason: str, attempt: Callable[[], None]) -> None:
        """Runs `attempt` until it succeeds, the daemon is asked to stop, or failures pile up
        (RuntimeFailure, naming the count and the last reason)."""
        started = self.clock()
        self.healing = True
        try:
            while not self.stop.is_set():
                self._count(reason)
                log.error("%s: lifting the redirect (traffic goes direct) and restarting", reason)
                if self.stop.wait(BACKOFF_S[min(len(self.failures), len(BACKOFF_S)) - 1]):
                    return
                try:
                    attempt()
                except (OSError, LlmtapError) as exc:
                    reason = f"restart failed: {exc}"
                    continue
                self.restarts += 1
                healed_in = round(self.clock() - started, 2)
                self.last = {"at": _now(), "reason": reason, "healed_in_s": healed_in}
                log.info("healed in %.1f s: intercepting again", healed_in)
                return
        finally:
            self.healing = False

    def _count(self, reason: str) -> None:
        now = self.clock()
        self.failures.append(now)
        while self.failures and now - self.failures[0] > FAILURE_WINDOW_S:
            self.failures.popleft()
        if len(self.failures) > MAX_FAILURES:
            raise RuntimeFailure(f"{len(self.failures)} failures in {FAILURE_WINDOW_S:.0f} s, the "
                                 f"last: {reason}")

    def status(self) -> dict[str, Any]:
        return {"restarts": self.restarts, "last_restart": self.last, "healing": self.healing}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
