"""`llmtap dashboard`: the live terminal view (rich).

Left: a card per request in flight (model, process, token counters while it streams, a progress
bar of output against max_tokens), then the latest calls. Right: today's calls, tokens and cost
with a gauge against `dashboard.daily_budget_usd`, the context-window use of the latest call per
model, and cost per process. Crossing a budget threshold turns the gauge yellow/red, shows a
banner and rings the terminal bell once per threshold and day.

The panels are drawn by llmtap.dashboard_view. Live events come from the daemon's control
socket; without a daemon the view is built from the SQLite index alone (and keeps trying to
connect).
"""

from __future__ import annotations

import datetime
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from llmtap import control
from llmtap.config import Config
from llmtap.context_windows import context_window
from llmtap.dashboard_view import render
from llmtap.errors import LlmtapError
from llmtap.formatting import money
from llmtap.records.index import Index
from rich.console import Console

HISTORY_EVERY_S = 2.0
RECONNECT_EVERY_S = 2.0
FRAME_S = 0.25

def local_midnight(now: float | None = None) -> float:
    moment = datetime.datetime.fromtimestamp(time.time() if now is None else now)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


@dataclass
class History:
    totals: dict[str, Any] = field(default_factory=dict)
    per_process: list[dict[str, Any]] = field(default_factory=list)
    context: list[dict[str, Any]] = field(default_factory=list)
    recent: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""
    error: str | None = None


def read_history(config: Config, read_only: bool) -> History:
    try:
        index = Index.open_reader(config.records_dir, read_only)
    except (OSError, sqlite3.Error) as exc:
        return History(error=f"no history: {exc}")
    try:
        since = local_midnight()
        context = []
        for row in index.latest_per_model(since):
            used = sum(row[k] or 0 for k in ("input_tokens", "cache_read_tokens",
                                             "cache_write_5m_tokens", "cache_write_1h_tokens",
                                             "output_tokens"))
            context.append({"model": row["model"], "used": used,
                            "window": context_window(row["model"])})
        return History(
            totals=index.totals(since),
            per_process=index.stats("process", since),
            context=context,
            recent=[dict(r) for r in index.calls(limit=8, counted_only=True)],
            source=index.source,
        )
    except sqlite3.Error as exc:
        return History(error=f"index unreadable: {exc}")
    finally:
        index.conn.close()


@dataclass
class State:
    config: Config
    active: dict[str, dict[str, Any]] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)
    connected: bool = False
    history: History = field(default_factory=History)
    alerted: set[tuple[str, float]] = field(default_factory=set)
    banner: str | None = None

    def apply(self, event: dict[str, Any]) -> bool:
        """Folds one live event in; True when a call ended (the history is stale)."""
        kind = event.get("type")
        if kind == "snapshot":
            self.active = {str(a["id"]): a for a in event.get("active", [])}
            self.counters = event.get("counters") or {}
        elif kind == "counters":
            self.counters = event.get("counters") or {}
        elif kind == "start":
            self.active[str(event["id"])] = dict(event)
        elif kind == "update" and str(event.get("id")) in self.active:
            self.active[str(event["id"])].update(event)
        elif kind == "end":
            self.active.pop(str(event.get("id")), None)
            return True
        elif kind == "alert":  # a budget threshold crossed (llmtap.addons.budgets)
            self.banner = str(event.get("message", ""))
        return False

    def check_budget(self) -> bool:
        """Whether a threshold was newly crossed (ring the bell)."""
        budget = self.config.dashboard.daily_budget_usd
        cost = float(self.history.totals.get("cost_usd") or 0)
        if budget <= 0:
            return False
        day = datetime.date.today().isoformat()
        crossed = [t for t in sorted(self.config.dashboard.alert_at) if cost >= budget * t]
        new = [t for t in crossed if (day, t) not in self.alerted]
        self.alerted.update((day, t) for t in crossed)
        if crossed:
            self.banner = (f"budget alert: {money(cost)} spent today, {cost / budget:.0%} of the "
                           f"{money(budget)} daily budget")
        return bool(new)


def listen(config: Config, events: queue.Queue[dict[str, Any]], stop: threading.Event) -> None:
    """Feeds live events into `events`; reconnects while the daemon is away."""
    while not stop.is_set():
        try:
            stream = control.subscribe(config.control_socket)
        except LlmtapError as exc:
            events.put({"type": "offline", "reason": str(exc)})
            stream = None
        if stream is None:
            events.put({"type": "offline"})
            stop.wait(RECONNECT_EVERY_S)
            continue
        events.put({"type": "online"})
        try:
            for event in stream:
                events.put(event)
                if stop.is_set():
                    return
        except (OSError, LlmtapError):
            pass
        events.put({"type": "offline"})


def run(config: Config, read_only: bool = False, once: bool = False) -> None:
    console = Console()
    state = State(config)
    state.history = read_history(config, read_only)
    if once:
        snapshot = _one_snapshot(config)
        if snapshot is not None:
            state.connected = True
            state.apply(snapshot)
        state.check_budget()
        console.print(render(state, console.size.width))
        return
    _live_loop(console, state, read_only)


def _one_snapshot(config: Config) -> dict[str, Any] | None:
    stream = control.subscribe(config.control_socket)
    if stream is None:
        return None
    first = next(stream, None)
    close = getattr(stream, "close", None)
    if close:
        close()  # a generator: closes the socket
    return first


def _live_loop(console: Console, state: State, read_only: bool) -> None:
    from rich.live import Live

    events: queue.Queue[dict[str, Any]] = queue.Queue()
    stop = threading.Event()
    threading.Thread(target=listen, args=(state.config, events, stop), daemon=True).start()
    next_history = time.monotonic() + HISTORY_EVERY_S
    if state.check_budget() and state.config.dashboard.bell:
        console.bell()
    try:
        with Live(render(state, console.size.width), console=console, screen=True,
                  auto_refresh=False) as live:
            while True:
                stale = _drain(state, events)
                if stale or time.monotonic() >= next_history:
                    state.history = read_history(state.config, read_only)
                    next_history = time.monotonic() + HISTORY_EVERY_S
                    if state.check_budget() and state.config.dashboard.bell:
                        console.bell()
                live.update(render(state, console.size.width), refresh=True)
                time.sleep(FRAME_S)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()


def _drain(state: State, events: queue.Queue[dict[str, Any]]) -> bool:
    stale = False
    while True:
        try:
            event = events.get_nowait()
        except queue.Empty:
            return stale
        if event.get("type") == "online":
            state.connected = True
        elif event.get("type") == "offline":
            state.connected, state.active = False, {}
        else:
            stale = state.apply(event) or stale
