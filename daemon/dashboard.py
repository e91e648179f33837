"""`llmtap dashboard`: the live terminal view (rich).

Left: a card per request in flight (model, process, token counters while it streams, a progress
bar of output against max_tokens), then the latest calls. Right: today's calls, tokens and cost
with a gauge against `dashboard.daily_budget_usd`, the context-window use of the latest call per
model, and cost per process. Crossing a budget threshold turns the gauge yellow/red, shows a
banner and rings the terminal bell once per threshold and day.

Live events come from the daemon's control socket; without a daemon the view is built from the
SQLite index alone (and keeps trying to connect).
"""

from __future__ import annotations

import datetime
import functools
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from llmtap import control
from llmtap.config import Config
from llmtap.errors import LlmtapError
from llmtap.formatting import money, tokens
from llmtap.records.index import Index
from rich.console import Console, Group, RenderableType
from rich.layout import Layout
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

HISTORY_EVERY_S = 2.0
RECONNECT_EVERY_S = 2.0
FRAME_S = 0.25
# Context windows (tokens) by model-name prefix, longest prefix first, for models whose row in the
# maintained data has none; unknown models show no %.
CONTEXT_WINDOWS: tuple[tuple[str, int], ...] = (
    ("claude-sonnet-4", 200_000), ("claude-opus-4", 200_000), ("claude-haiku-4", 200_000),
    ("claude-3", 200_000), ("claude", 200_000),
    ("gpt-4.1", 1_047_576), ("gpt-4o", 128_000), ("gpt-4-turbo", 128_000), ("gpt-5", 400_000),
    ("o4-mini", 200_000), ("o3", 200_000), ("o1", 200_000), ("codex", 400_000),
    ("gemini-2.5", 1_048_576), ("gemini-2.0", 1_048_576), ("gemini-1.5-pro", 2_097_152),
    ("gemini", 1_048_576), ("grok", 256_000), ("deepseek", 128_000), ("mistral-large", 128_000),
)


@functools.lru_cache(maxsize=1024)
def context_window(model: str | None) -> int | None:
    """The model's context window from the maintained data (genai-prices), else by its prefix."""
    from llmtap import price_data
    from llmtap.pricing import find_row

    if model and (row := find_row(price_data.bundled(), model, "")) and row[1].context_window:
        return row[1].context_window
    name = (model or "").lower().split("/")[-1]
    for prefix, size in sorted(CONTEXT_WINDOWS, key=lambda p: -len(p[0])):
        if name.startswith(prefix):
            return size
    return None


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


# --- rendering ---------------------------------------------------------------------------------


def _who(process: Any) -> str:
    if not isinstance(process, dict):
        return "unknown process"
    name = process.get("tool") or process.get("name") or "?"
    if process.get("tool") and process.get("name") and process["tool"] != process["name"]:
        name = f"{process['tool']}/{process['name']}"
    return f"{name}[{process.get('pid')}]"


def card(request: dict[str, Any], now: float) -> Panel:
    out = request.get("output_tokens") or request.get("output_tokens_estimate") or 0
    estimated = not request.get("output_tokens") and bool(request.get("output_tokens_estimate"))
    limit = request.get("max_tokens")
    lines: list[RenderableType] = [
        Text(f"{request.get('method', '')} {request.get('host', '')}{request.get('path', '')}",
             style="dim"),
        Text(f"in {tokens(request.get('input_tokens'))} · out {'~' if estimated else ''}"
             f"{tokens(out)} tok · {request.get('chunks') or 0} chunks · "
             f"{now - float(request.get('ts') or now):.1f}s"),
    ]
    if isinstance(limit, int) and limit > 0:
        lines.append(ProgressBar(total=limit, completed=min(out, limit), width=40))
        lines.append(Text(f"{min(out, limit)}/{limit} max_tokens", style="dim"))
    title = f"[bold]{request.get('model') or 'unknown model'}[/] · {_who(request.get('process'))}"
    return Panel(Group(*lines), title=title, title_align="left", border_style="cyan")


def _active(state: State) -> RenderableType:
    if not state.active:
        return Panel(Text("no requests in flight", style="dim"), title="Active requests")
    now = time.time()
    cards = [card(r, now) for r in list(state.active.values())[-6:]]
    return Panel(Group(*cards), title=f"Active requests ({len(state.active)})")


def _recent(state: State) -> RenderableType:
    table = Table(expand=True, box=None)
    for title in ("time", "process", "model", "status", "in→out", "cost", "ttft"):
        table.add_column(title, no_wrap=True)
    for row in reversed(state.history.recent):
        started = datetime.datetime.fromtimestamp(row["started_ts"] or 0).strftime("%H:%M:%S")
        process = row["process_tool"] or row["process_name"] or "?"
        status = str(row["status"]) if row["status"] is not None else "---"
        table.add_row(started, f"{process}[{row['process_pid']}]", row["model"] or "?",
                      Text(status, style="red" if row["error"] or (row["status"] or 0) >= 400 else ""),
                      f"{tokens(row['input_tokens'])}→{tokens(row['output_tokens'])}",
                      money(row["cost_usd"]),
                      "—" if row["ttft_ms"] is None else f"{row['ttft_ms']:.0f}ms")
    return Panel(table, title="Latest calls")


def _budget(state: State) -> RenderableType:
    totals = state.history.totals
    cost = float(totals.get("cost_usd") or 0)
    budget = state.config.dashboard.daily_budget_usd
    table = Table.grid(padding=(0, 2))
    table.add_column()
    table.add_column(justify="right")
    table.add_row("calls", str(totals.get("calls") or 0))
    for key, label in (("input_tokens", "input"), ("output_tokens", "output"),
                       ("cache_read_tokens", "cache read"), ("cache_write_5m_tokens", "cache write 5m"),
                       ("cache_write_1h_tokens", "cache write 1h"), ("reasoning_tokens", "reasoning")):
        table.add_row(label, tokens(totals.get(key)))
    unpriced = totals.get("unpriced") or 0
    table.add_row("cost", money(cost) + (f" (+{unpriced} unpriced)" if unpriced else ""))
    parts: list[RenderableType] = [table]
    if budget > 0:
        share = cost / budget
        thresholds = sorted(state.config.dashboard.alert_at) or [1.0]
        colour = "red" if share >= thresholds[-1] else "yellow" if share >= thresholds[0] else "green"
        parts += [Text(f"budget {money(cost)} of {money(budget)} ({share:.0%})", style=colour),
                  ProgressBar(total=budget, completed=min(cost, budget), width=36,
                              complete_style=colour, finished_style=colour)]
    for row in (state.counters.get("policy") or [])[:6]:  # `llmtap budget|limit` with their use
        parts.append(Text(_policy_text(row), style="red" if _spent(row) else "", no_wrap=True,
                          overflow="ellipsis"))
    return Panel(Group(*parts), title="Today")


def _policy_text(row: dict[str, Any]) -> str:
    """One budget or limit, short: `work $5.50/$5.00 today +$0.25 in flight`."""
    if row.get("kind") == "limit":
        rates = [f"{row.get(used) or 0}/{row[cap]} {cap}"
                 for cap, used in (("rpm", "calls_last_minute"), ("tpm", "tokens_last_minute"))
                 if row.get(cap)]
        return f"limit {row.get('name')} {', '.join(rates)}"
    caps = [f"{money(spent)}/{money(cap)} {period}"
            for cap, spent, period in ((row.get("daily"), row.get("spent_today"), "today"),
                                       (row.get("monthly"), row.get("spent_month"), "month"))
            if cap]
    flying = f" +{money(row['in_flight'])} in flight" if row.get("in_flight") else ""
    return f"budget {row.get('name')} {', '.join(caps)}{flying}"


def _spent(row: dict[str, Any]) -> bool:
    caps = ((row.get("daily"), row.get("spent_today")), (row.get("monthly"), row.get("spent_month")))
    return any(cap and (spent or 0) >= cap for cap, spent in caps)


def _context(state: State) -> RenderableType:
    if not state.history.context:
        return Panel(Text("no calls today", style="dim"), title="Context window (latest call)")
    rows: list[RenderableType] = []
    for item in state.history.context[:5]:
        window = item["window"]
        if window:
            share = item["used"] / window
            colour = "red" if share > 0.9 else "yellow" if share > 0.7 else "green"
            rows += [Text(f"{item['model']}: {tokens(item['used'])}/{tokens(window)} ({share:.0%})"),
                     ProgressBar(total=window, completed=min(item["used"], window), width=36,
                                 complete_style=colour)]
        else:
            rows.append(Text(f"{item['model']}: {tokens(item['used'])} (window unknown)"))
    return Panel(Group(*rows), title="Context window (latest call)")


def _processes(state: State) -> RenderableType:
    table = Table(expand=True, box=None)
    table.add_column("process")
    table.add_column("calls", justify="right")
    table.add_column("cost", justify="right")
    for group in state.history.per_process[:8]:
        table.add_row(str(group["key"] or "?"), str(group["calls"]), money(group["cost_usd"]))
    return Panel(table, title="Cost per process (today)")


def _header(state: State) -> Text:
    if state.connected:
        counters = state.counters
        text = Text(f" llmtap · live · {counters.get('requests', 0)} requests, "
                    f"{counters.get('records_written', 0)} recorded, "
                    f"{counters.get('records_dropped', 0)} dropped", style="bold white on blue")
    else:
        source = state.history.source or "nothing"
        text = Text(f" llmtap · daemon not running · history from the {source}",
                    style="bold black on yellow")
    if state.history.error:
        text.append(f" · {state.history.error}")
    return text


def render(state: State, width: int = 120) -> RenderableType:
    layout = Layout()
    parts = [Layout(_header(state), size=1)]
    if state.banner:
        parts.append(Layout(Text(f" ⚠ {state.banner}", style="bold white on red"), size=1))
    body = Layout()
    parts.append(body)
    layout.split_column(*parts)
    left = Layout(name="left", ratio=3)
    right = Layout(name="right", ratio=2, minimum_size=40)
    body.split_row(left, right)
    left.split_column(Layout(_active(state), ratio=3), Layout(_recent(state), ratio=2))
    shown = min(len(state.counters.get("policy") or []), 6)  # budgets and limits, a line each
    right.split_column(Layout(_budget(state), size=13 + shown), Layout(_context(state), ratio=1),
                       Layout(_processes(state), ratio=1))
    return layout
