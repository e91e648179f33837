"""`llmtap dashboard`'s panels (rich), drawn from its State (llmtap.dashboard): the requests in
flight, the latest calls, today's budget, the context-window use and the cost per process."""

from __future__ import annotations

import datetime
import time
from typing import TYPE_CHECKING, Any

from llmtap.formatting import money, tokens
from rich.console import Group, RenderableType
from rich.layout import Layout
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from llmtap.dashboard import State


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
