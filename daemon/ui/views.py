"""The UI's pages: live feed, sessions, a call as a conversation, charts, search, raw records.

Pages are rendered on the server (Jinja2, autoescaped); reads run in a thread so the live feed
never waits on the disk.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from llmtap.config import Config
from llmtap.formatting import local_time, money, tokens
from llmtap.records import store
from llmtap.ui import charts, history
from llmtap.ui.app import Handler, Reply, Stream
from llmtap.ui.calls import load
from llmtap.ui.conversation import conversation, diff
from llmtap.ui.live import LiveFeed
from llmtap.ui.sessions import Sessions

TEMPLATES = Path(__file__).parent / "templates"
ID = r"(?P<id>[A-Za-z0-9_-]{1,100})"
SEARCH_FILES = 500  # the newest calls whose text a search reads
SINCE = {"1d": 86400, "7d": 7 * 86400, "30d": 30 * 86400, "all": None}


class Views:
    def __init__(self, config: Config, token: str, live: LiveFeed) -> None:
        self.config, self.token, self.live = config, token, live
        self.records_dir = config.records_dir
        self.sessions = Sessions(self.records_dir)
        self.billed = history.Billed(self.records_dir)
        self._lock = threading.Lock()  # Sessions learns as it goes: one reader at a time
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                                      autoescape=True)
        self.env.globals.update(u=self.url, tokens=tokens, money=money, when=local_time,
                                token=token)

    def url(self, path: str, **params: Any) -> str:
        query = {k: v for k, v in params.items() if v is not None}
        return f"{quote(path)}?{urlencode({**query, 'token': self.token})}"

    def routes(self) -> list[tuple[re.Pattern[str], Handler]]:
        table: list[tuple[str, Handler]] = [
            ("/", self.threaded(self.feed)), ("/fragments/recent", self.threaded(self.recent)),
            ("/events", self.events), ("/sessions", self.threaded(self.session_list)),
            ("/session/(?P<key>[^/]{1,200})", self.threaded(self.session)),
            (f"/call/{ID}", self.threaded(self.call)),
            (f"/call/{ID}\\.(?P<kind>json|md)", self.threaded(self.raw)),
            ("/charts", self.threaded(self.charts_page)),
            ("/api/series", self.threaded(self.series)), ("/search", self.threaded(self.search)),
        ]
        return [(re.compile(path), handler) for path, handler in table]

    def threaded(self, view: Any) -> Handler:
        async def handler(params: dict[str, str]) -> Reply | Stream:
            return await asyncio.to_thread(self._locked, view, params)
        return handler

    def _locked(self, view: Any, params: dict[str, str]) -> Reply | Stream:
        with self._lock:
            reply: Reply | Stream = view(params)
            return reply

    def page(self, name: str, **values: Any) -> Reply:
        return Reply(200, self.env.get_template(name).render(**values))

    async def events(self, params: dict[str, str]) -> Stream:
        return Stream(self.live.events, "text/event-stream")

    # --- pages --------------------------------------------------------------------------------

    def feed(self, params: dict[str, str]) -> Reply:
        with history.opened(self.records_dir) as index:
            rows = history.recent(index)
        return self.page("feed.html", rows=self._decorate(rows), nav="live")

    def recent(self, params: dict[str, str]) -> Reply:
        with history.opened(self.records_dir) as index:
            rows = history.recent(index)
        return self.page("recent.html", rows=self._decorate(rows))

    def _decorate(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**row, "context": history.context_use(row)} for row in rows]

    def _grouped(self, index: Any, until_ts: float | None = None) -> tuple[list[dict[str, Any]],
                                                                             dict[str, str]]:
        rows = history.window(index, until_ts)
        return rows, self.sessions.assign(rows)

    def session_list(self, params: dict[str, str]) -> Reply:
        with history.opened(self.records_dir) as index:
            rows, keys = self._grouped(index)
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            if row["id"] in keys:
                groups[keys[row["id"]]].append(row)
        listed = [self._summary(key, calls) for key, calls in groups.items()]
        listed.sort(key=lambda s: -(s["last"] or 0))
        return self.page("sessions.html", sessions=listed, nav="sessions")

    def _summary(self, key: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
        first = calls[0]
        billed = self.billed.keep(calls)
        return {"key": key, "label": self.sessions.label(first) or key, "calls": len(calls),
                "first": first["started_ts"], "last": calls[-1]["started_ts"],
                "tool": first["process_tool"] or first["process_name"] or "?",
                "models": sorted({c["model"] or "?" for c in calls}),
                "cost": sum(c["cost_usd"] or 0 for c in billed),
                "input": sum((c["input_tokens"] or 0) + (c["cache_read_tokens"] or 0) for c in billed),
                "output": sum(c["output_tokens"] or 0 for c in billed)}

    def session(self, params: dict[str, str]) -> Reply:
        with history.opened(self.records_dir) as index:
            rows, keys = self._grouped(index)
        calls = self._decorate([r for r in rows if keys.get(r["id"]) == params["key"]])
        if not calls:
            return Reply(404, self.env.get_template("missing.html").render(what="session"))
        points = [(c["started_ts"], c["context"]["percent"]) for c in calls
                  if c["started_ts"] and c["context"]["percent"] is not None]
        context = {"labels": ["context window %"], "data": [[p[0] for p in points], [p[1] for p in points]]}
        return self.page("session.html", summary=self._summary(params["key"], calls), calls=calls,
                         nav="sessions", context_json=json.dumps(context))

    def call(self, params: dict[str, str]) -> Reply:
        with history.opened(self.records_dir) as index:
            row = history.find(index, params["id"])
            if row is None:
                return Reply(404, self.env.get_template("missing.html").render(what="call"))
            rows, keys = self._grouped(index, row["started_ts"])
        current = load(self.records_dir, row["location"])
        if current is None:
            return Reply(404, self.env.get_template("missing.html").render(what="record"))
        key = keys.get(row["id"])
        before = [r for r in rows if keys.get(r["id"]) == key and r["id"] != row["id"]
                  and (r["started_ts"] or 0) <= (row["started_ts"] or 0)]
        convo = conversation(current)
        previous, changes = None, None
        if before and (older := load(self.records_dir, before[-1]["location"])) is not None:
            previous, changes = before[-1], diff(conversation(older), convo)
        return self.page("call.html", row=row, record=current.record, convo=convo, key=key,
                         previous=previous, diff=changes, context=history.context_use(row),
                         pretty=json.dumps, nav="sessions")

    def raw(self, params: dict[str, str]) -> Reply:
        with history.opened(self.records_dir) as index:
            row = history.find(index, params["id"])
        if row is None:
            return Reply(404, "not found\n", "text/plain; charset=utf-8")
        location = row["location"] if params["kind"] == "json" else store.markdown_location(row["location"])
        data = store.read_location(self.records_dir, location)
        if data is None:
            return Reply(404, "the record's file is gone\n", "text/plain; charset=utf-8")
        kind = "application/json" if params["kind"] == "json" else "text/plain; charset=utf-8"
        return Reply(200, data, kind)

    def charts_page(self, params: dict[str, str]) -> Reply:
        by = params.get("by") if params.get("by") in charts.GROUPINGS else "model"
        bucket = params.get("bucket") if params.get("bucket") in charts.BUCKETS else "hour"
        since = params.get("since") if params.get("since") in SINCE else "7d"
        return self.page("charts.html", by=by, bucket=bucket, since=since, nav="charts",
                         groupings=charts.GROUPINGS, buckets=list(charts.BUCKETS), spans=list(SINCE))

    def series(self, params: dict[str, str]) -> Reply:
        by = _choice(params.get("by"), charts.GROUPINGS, "model")
        bucket = _choice(params.get("bucket"), tuple(charts.BUCKETS), "hour")
        span = SINCE.get(params.get("since") or "7d", SINCE["7d"])
        with history.opened(self.records_dir) as index:
            rows = self.billed.keep(history.usage_rows(index, time.time() - span if span else None))
            labels: dict[str, str] = {}
            if by == "session":
                window, keys = self._grouped(index)
                names = {keys[r["id"]]: self.sessions.label(r) for r in window if r["id"] in keys}
                labels = {i: (names.get(k) or k)[:40] for i, k in keys.items()}
        data = charts.series(rows, by, bucket, labels)
        return Reply(200, json.dumps(data), "application/json")

    def search(self, params: dict[str, str]) -> Reply:
        text = (params.get("q") or "").strip()[:200]
        rows: list[dict[str, Any]] = []
        if text:
            with history.opened(self.records_dir) as index:
                rows = history.search(index, text)
                seen = {r["id"] for r in rows}
                rows += [r for r in self._text_hits(index, text) if r["id"] not in seen]
        return self.page("search.html", q=text, rows=self._decorate(rows), nav="search")

    def _text_hits(self, index: Any, text: str) -> list[dict[str, Any]]:
        """Calls among the newest whose exchange (the masked Markdown twin) holds the text."""
        found: list[dict[str, Any]] = []
        needle = text.lower()
        for row in history.recent(index, SEARCH_FILES):
            data = store.read_location(self.records_dir, store.markdown_location(row["location"]))
            if data and needle in data.decode("utf-8", "replace").lower():
                found.append(row)
        return found


def _choice(value: str | None, allowed: tuple[str, ...], default: str) -> str:
    return value if value in allowed else default
