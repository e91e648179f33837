"""The supervisor's fan-out of live events to the control socket's subscribers (the dashboard).

It keeps the requests in flight, so a subscriber that connects mid-stream sees them at once.
Each subscriber has a bounded queue: a slow or stuck one loses events (and is told so), and
never holds up the worker's reports or the other subscribers.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

SUBSCRIBER_QUEUE = 2000
HEARTBEAT_S = 1.0
SEND_TIMEOUT_S = 10.0
MAX_ACTIVE = 1000


class LiveHub:
    def __init__(self, counters: Callable[[], dict[str, Any]]) -> None:
        self.counters = counters
        self.active: dict[str, dict[str, Any]] = {}
        self._subscribers: set[queue.Queue[dict[str, Any]]] = set()
        self._lock = threading.Lock()

    def publish(self, events: list[dict[str, Any]]) -> None:
        with self._lock:
            for event in events:
                self._track(event)
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            for event in events:
                try:
                    subscriber.put_nowait(event)
                except queue.Full:
                    break  # this one lags; it gets a fresh snapshot when it catches up

    def _track(self, event: dict[str, Any]) -> None:
        kind, flow_id = event.get("type"), str(event.get("id"))
        if kind == "start":
            self.active[flow_id] = dict(event)
            while len(self.active) > MAX_ACTIVE:
                self.active.pop(next(iter(self.active)))
        elif kind == "update" and flow_id in self.active:
            self.active[flow_id].update({k: v for k, v in event.items() if k != "type"})
        elif kind == "end":
            self.active.pop(flow_id, None)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            active = [dict(a) for a in self.active.values()]
        return {"type": "snapshot", "ts": time.time(), "active": active,
                "counters": self.counters()}

    def serve(self, conn: socket.socket) -> None:
        """Streams JSON lines to one subscriber until it hangs up."""
        mine: queue.Queue[dict[str, Any]] = queue.Queue(SUBSCRIBER_QUEUE)
        with self._lock:
            self._subscribers.add(mine)
        conn.settimeout(SEND_TIMEOUT_S)
        try:
            self._send(conn, self.snapshot())
            while True:
                try:
                    event = mine.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    self._send(conn, {"type": "counters", "ts": time.time(),
                                      "counters": self.counters()})
                    continue
                if mine.full():  # fell behind: start over from a snapshot
                    with contextlib.suppress(queue.Empty):
                        while True:
                            mine.get_nowait()
                    self._send(conn, self.snapshot())
                    continue
                self._send(conn, event)
        except OSError:
            return  # the subscriber left (or stopped reading for SEND_TIMEOUT_S)
        finally:
            with self._lock:
                self._subscribers.discard(mine)

    @staticmethod
    def _send(conn: socket.socket, event: dict[str, Any]) -> None:
        conn.sendall(json.dumps(event, default=str).encode() + b"\n")

    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)
