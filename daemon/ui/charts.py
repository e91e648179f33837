"""Series for the charts (uPlot's aligned arrays): cost by group, tokens by kind, cache hits and
context-window use, over time buckets of an hour or a day."""

from __future__ import annotations

import datetime
from collections import defaultdict
from typing import Any

from llmtap.context_windows import context_window

TOP_GROUPS = 8
BUCKETS = {"minute": 60, "hour": 3600, "day": 86400}
GROUPINGS = ("model", "process", "session")


def bucket_start(ts: float, bucket: str) -> float:
    moment = datetime.datetime.fromtimestamp(ts)
    moment = moment.replace(second=0, microsecond=0)
    if bucket in ("hour", "day"):
        moment = moment.replace(minute=0)
    if bucket == "day":
        moment = moment.replace(hour=0)
    return moment.timestamp()


def series(rows: list[dict[str, Any]], by: str, bucket: str,
           sessions: dict[str, str] | None = None) -> dict[str, Any]:
    """rows: billed calls oldest first (history.usage_rows); sessions: id -> session label."""
    def group_of(row: dict[str, Any]) -> str:
        if by == "session":
            return (sessions or {}).get(row["id"], "?")
        return str(row.get(by) or "?")

    starts = sorted({bucket_start(r["started_ts"], bucket) for r in rows if r["started_ts"]})
    if len(starts) == 1:  # one bucket: its empty neighbours too, so it is drawn as a bucket
        starts = [starts[0] - BUCKETS[bucket], starts[0], starts[0] + BUCKETS[bucket]]
    slot = {start: i for i, start in enumerate(starts)}
    totals: dict[str, float] = defaultdict(float)
    for row in rows:
        totals[group_of(row)] += row["cost_usd"] or 0
    top = [g for g, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:TOP_GROUPS]]
    cost = {g: [0.0] * len(starts) for g in [*top, "other"]}
    kinds = {k: [0] * len(starts) for k in ("input", "output", "cache read", "cache write")}
    for row in rows:
        if not row["started_ts"]:
            continue
        i = slot[bucket_start(row["started_ts"], bucket)]
        group = group_of(row)
        cost[group if group in top else "other"][i] += row["cost_usd"] or 0
        kinds["input"][i] += row["input_tokens"] or 0
        kinds["output"][i] += row["output_tokens"] or 0
        kinds["cache read"][i] += row["cache_read_tokens"] or 0
        kinds["cache write"][i] += (row["cache_write_5m_tokens"] or 0) + (row["cache_write_1h_tokens"] or 0)
    if not any(cost["other"]):
        del cost["other"]
    return {
        "cost": {"labels": list(cost), "data": [starts, *[_round(v) for v in cost.values()]]},
        "tokens": {"labels": list(kinds), "data": [starts, *kinds.values()]},
        "cache": {"labels": ["cache hit %"], "data": [starts, _hit_ratio(kinds)]},
        "context": _context(rows),
        "groups": [{"name": g, "cost": round(totals[g], 6)} for g in top],
        "bucket_s": BUCKETS[bucket],
    }


def _round(values: list[float]) -> list[float]:
    return [round(v, 6) for v in values]


def _hit_ratio(kinds: dict[str, list[int]]) -> list[float | None]:
    out: list[float | None] = []
    for read, fresh, write in zip(kinds["cache read"], kinds["input"], kinds["cache write"], strict=True):
        prompt = read + fresh + write
        out.append(round(100 * read / prompt, 1) if prompt else None)
    return out


def _context(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per call: the share of the model's context window it used."""
    xs: list[float] = []
    ys: list[float] = []
    for row in rows:
        window = context_window(row.get("model"))
        used = sum(row[k] or 0 for k in ("input_tokens", "cache_read_tokens", "cache_write_5m_tokens",
                                         "cache_write_1h_tokens", "output_tokens"))
        if window and used and row["started_ts"]:
            xs.append(row["started_ts"])
            ys.append(round(100 * used / window, 2))
    return {"labels": ["context window %"], "data": [xs, ys]}
