"""The daemon's live feed (control socket), fanned out to the UI's browsers as server-sent events.

One thread subscribes to the control socket, as the terminal dashboard does, and reconnects while
the daemon is away. Each browser has a bounded queue: a slow one loses events, never memory.
Only the fields the feed shows are passed on, and text is masked like the records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

from llmtap import control
from llmtap.config import Config
from llmtap.errors import LlmtapError
from llmtap.records.capture import mask_secrets

QUEUE = 500
RECONNECT_S = 2.0
KEEPALIVE_S = 15.0
FIELDS = ("type", "id", "ts", "host", "method", "path", "model", "provider", "api", "max_tokens",
          "status", "usage", "cost_usd", "ttft_ms", "duration_ms", "chunks", "error", "bytes",
          "input_tokens", "output_tokens", "output_tokens_estimate")
PROCESS_FIELDS = ("pid", "name", "tool", "user")


def shown(event: dict[str, Any]) -> dict[str, Any]:
    out = {k: event[k] for k in FIELDS if k in event}
    if isinstance(event.get("process"), dict):
        out["process"] = {k: event["process"].get(k) for k in PROCESS_FIELDS}
    if isinstance(event.get("active"), list):
        out["active"] = [shown(a) for a in event["active"] if isinstance(a, dict)]
    for key in ("error", "path"):
        if isinstance(out.get(key), str):
            out[key] = mask_secrets(out[key])
    return out


class LiveFeed:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.online = False
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        threading.Thread(target=self._listen, name="llmtap-ui-live", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                stream = control.subscribe(self.config.control_socket)
            except LlmtapError:
                stream = None
            if stream is not None:
                self._publish({"type": "online"})
                with contextlib.suppress(OSError, LlmtapError):
                    for event in stream:
                        self._publish(shown(event))
                        if self._stop.is_set():
                            return
            self._publish({"type": "offline"})
            self._stop.wait(RECONNECT_S)

    def _publish(self, event: dict[str, Any]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._fan_out, event)

    def _fan_out(self, event: dict[str, Any]) -> None:
        if event["type"] in ("online", "offline"):
            self.online = event["type"] == "online"
        for queue in list(self._queues):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)

    async def events(self) -> AsyncIterator[bytes]:
        """Server-sent events for one browser, until it leaves."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE)
        self._queues.add(queue)
        try:
            yield _sse({"type": "online" if self.online else "offline"})
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                yield _sse(event)
        finally:
            self._queues.discard(queue)


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, default=str)}\n\n".encode()
