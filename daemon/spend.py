"""What budgets and rate limits count: money spent per local day (from the priced records and the
calls completed since), the estimate a call in flight reserves, and the sliding minute of each
rate limit.

Spend is kept as sums per (local day, credential, model, process, user): loaded once from the
records index (this month's counted records), then added to as this worker prices each call, so
a budget added or changed later is computed from the same sums without reading the index again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import sqlite3
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtap.budgets import Budget, Limit, month_start, periods
from llmtap.parsers.base import as_dict
from llmtap.pricing import Call, Pricer
from llmtap.records.index import COUNTED, index_path

log = logging.getLogger(__name__)

# ESTIMATE of a call before it runs: its input as request bytes / BYTES_PER_TOKEN (JSON and
# base64 make this an over-estimate, the safe side) and its output as its max tokens, or
# DEFAULT_OUTPUT when it names none, priced by the pricing stage's prices.
BYTES_PER_TOKEN = 4
DEFAULT_OUTPUT = 4096
MAX_TOKENS = 10**12  # more than any call can use; caps the estimate's counts so it stays a float
TOKEN_KEYS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_5m_tokens",
              "cache_write_1h_tokens")  # what a tokens-per-minute limit counts

# (local day, credential, model, process name, tool, exe, user)
Key = tuple[str, str | None, str | None, str | None, str | None, str | None, str | None]
# Distinct sums kept; beyond it a new key keeps only its day, credential, tool and user (process
# names and exe paths are the caller's to vary; models without a price never get here).
MAX_KEYS = 50_000
WINDOW_S = 60.0
MAX_WINDOW = 100_000  # completed calls remembered per tpm window
LOAD_SQL = (
    "SELECT date(started_ts, 'unixepoch', 'localtime') AS day, credential, model, process_name, "
    "process_tool, process_user, SUM(cost_usd) FROM calls WHERE {counted} AND cost_usd IS NOT NULL "
    "AND started_ts >= ? GROUP BY 1, 2, 3, 4, 5, 6"
)


def key_of(day: str, call: dict[str, Any]) -> Key:
    process = as_dict(call.get("process"))

    def text(value: Any) -> str | None:
        return None if value is None else str(value)

    return (day, text(call.get("credential")), text(call.get("model")), text(process.get("name")),
            text(process.get("tool")), text(process.get("exe")), text(process.get("user")))


def call_of(key: Key) -> dict[str, Any]:
    """The key as the fields a selector reads."""
    _, credential, model, name, tool, exe, user = key
    process = {k: v for k, v in (("name", name), ("tool", tool), ("exe", exe), ("user", user)) if v}
    return {"credential": credential, "model": model, "process": process}


class Ledger:
    """Money spent, per key; each budget's day and month totals cached until the day changes."""

    def __init__(self) -> None:
        self.sums: dict[Key, float] = {}
        self._totals: dict[Budget, tuple[str, float, float]] = {}

    def load_index(self, records_dir: Path, now: float) -> int:
        """This month's spend from the index; the number of sums read (0 without an index)."""
        path = index_path(records_dir)
        if not path.exists():
            return 0
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
            with contextlib.closing(conn):
                rows = conn.execute(LOAD_SQL.format(counted=COUNTED), (month_start(now),)).fetchall()
        except sqlite3.Error as exc:
            log.warning("budgets: records index unreadable, spend starts at 0: %s", exc)
            return 0
        for day, credential, model, name, tool, user, cost in rows:
            key: Key = (str(day), credential, model, name, tool, None, user)
            self.sums[key] = self.sums.get(key, 0.0) + float(cost or 0.0)
        self._totals.clear()
        return len(rows)

    def add(self, day: str, call: dict[str, Any], cost: float) -> None:
        key = key_of(day, call)
        if key not in self.sums and len(self.sums) >= MAX_KEYS:
            key = (key[0], key[1], None, None, key[4], None, key[6])
        self.sums[key] = self.sums.get(key, 0.0) + cost
        for budget, cached in list(self._totals.items()):  # the covering budgets' totals follow
            if not budget.where.matches(call):
                continue
            if cached[0] == day:
                self._totals[budget] = (day, cached[1] + cost, cached[2] + cost)
            elif cached[0][:7] == day[:7]:
                self._totals[budget] = (cached[0], cached[1], cached[2] + cost)

    def spent(self, budget: Budget, now: float) -> tuple[float, float]:
        """(today, this month) in USD."""
        day, month = periods(now)
        cached = self._totals.get(budget)
        if cached is None or cached[0] != day:
            self._forget_before(month)
            today = this_month = 0.0
            for key, cost in self.sums.items():
                if key[0][:7] == month and budget.where.matches(call_of(key)):
                    this_month += cost
                    today += cost if key[0] == day else 0.0
            cached = self._totals[budget] = (day, today, this_month)
        return cached[1], cached[2]

    def forget(self) -> None:
        """The cached totals (the policy changed)."""
        self._totals.clear()

    def _forget_before(self, month: str) -> None:
        old = [key for key in self.sums if key[0][:7] < month]
        for key in old:
            del self.sums[key]


@dataclass
class Reservation:
    budgets: tuple[Budget, ...]
    limits: tuple[Limit, ...]
    estimate: float
    model: str | None  # the model asked for (the reply may name it otherwise)
    day: str  # the period the call's cost belongs to (its start)
    started: float


class Windows:
    """The sliding minute of each rate limit: calls admitted (rpm), tokens completed (tpm)."""

    def __init__(self) -> None:
        self.admitted: dict[str, collections.deque[float]] = {}
        self.tokens: dict[str, collections.deque[tuple[float, int]]] = {}

    def keep(self, limits: tuple[Limit, ...]) -> None:
        """Drops the windows of limits that are gone."""
        names = {lim.name for lim in limits}
        for table in (self.admitted, self.tokens):
            for name in [n for n in table if n not in names]:
                del table[name]
        for lim in limits:  # a changed rpm keeps the calls already in its minute
            calls = self.admitted.get(lim.name)
            if calls is not None and lim.rpm is not None and calls.maxlen != lim.rpm:
                self.admitted[lim.name] = collections.deque(calls, maxlen=lim.rpm)

    def retry_after(self, lim: Limit, now: float) -> float:
        """Seconds until the limit has room for one more call (0: it has now)."""
        wait = 0.0
        calls = self.admitted.get(lim.name)
        if lim.rpm is not None and calls is not None:
            _expire(calls, now)
            if len(calls) >= lim.rpm:
                wait = calls[len(calls) - lim.rpm] + WINDOW_S - now
        used = self.tokens.get(lim.name)
        if lim.tpm is not None and used is not None:
            _expire_tokens(used, now)
            total = sum(n for _, n in used)
            for moment, count in used:  # the oldest leave first
                if total < lim.tpm:
                    break
                total -= count
                wait = max(wait, moment + WINDOW_S - now)
        return max(0.0, wait)

    def admit(self, lim: Limit, now: float) -> None:
        if lim.rpm is not None:
            self.admitted.setdefault(lim.name, collections.deque(maxlen=lim.rpm)).append(now)

    def completed(self, lim: Limit, now: float, tokens: int) -> None:
        if lim.tpm is not None and tokens > 0:
            used = self.tokens.setdefault(lim.name, collections.deque(maxlen=MAX_WINDOW))
            used.append((now, tokens))

    def use(self, lim: Limit, now: float) -> tuple[int, int]:
        """(calls, tokens) in the last minute."""
        calls = self.admitted.get(lim.name, collections.deque())
        used = self.tokens.get(lim.name, collections.deque())
        _expire(calls, now)
        _expire_tokens(used, now)
        return len(calls), sum(n for _, n in used)


def _expire(calls: collections.deque[float], now: float) -> None:
    while calls and calls[0] <= now - WINDOW_S:
        calls.popleft()


def _expire_tokens(used: collections.deque[tuple[float, int]], now: float) -> None:
    while used and used[0][0] <= now - WINDOW_S:
        used.popleft()


RateKey = tuple[int, str | None, str, str, str | None]
RATES_KEPT = 1024  # (prices, model, host, path, provider) whose per-token rates are kept
_rates: OrderedDict[RateKey, tuple[float, float] | None] = OrderedDict()


def rates(pricer: Pricer, model: str | None, host: str, path: str,
          provider: str | None) -> tuple[float, float] | None:
    """USD per input and per output token; None for a model with no price. Quoting a call costs
    ~0.5 ms (genai-prices), too much for every request: the two rates are quoted once per model
    and kept (so a tiered price is estimated at its first tier)."""
    key = (id(pricer), model, host, path.split("?", 1)[0], provider)
    if key in _rates:
        _rates.move_to_end(key)
        return _rates[key]
    found: list[float] = []
    for usage in ({"input_tokens": 1000}, {"output_tokens": 1000}):  # under any tier
        quote = pricer.quote(Call(model, usage, host, path, provider))
        found.append(0.0 if quote.cost is None else float(quote.cost) / 1000)
    _rates[key] = None if not any(found) else (found[0], found[1])
    while len(_rates) > RATES_KEPT:
        _rates.popitem(last=False)
    return _rates[key]


def estimate(pricer: Pricer, info: Any, body_bytes: int, host: str, path: str) -> float:
    """The worst-case cost of a call not yet made, in USD (0 for a model with no price)."""
    output = getattr(info, "max_tokens", None)
    output = min(output, MAX_TOKENS) if isinstance(output, int) and output > 0 else DEFAULT_OUTPUT
    per_token = rates(pricer, getattr(info, "model", None), host, path,
                      getattr(info, "provider", None))
    if per_token is None:
        return 0.0
    return min(body_bytes // BYTES_PER_TOKEN, MAX_TOKENS) * per_token[0] + output * per_token[1]


def tokens_of(usage: Any) -> int:
    if not isinstance(usage, dict):
        return 0
    return sum(v for k in TOKEN_KEYS if isinstance(v := usage.get(k), int))


def seconds(wait: float) -> int:
    """A Retry-After value: whole seconds, at least 1."""
    return max(1, math.ceil(wait))
