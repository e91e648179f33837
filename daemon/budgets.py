"""Spending caps and rate limits: the policy file (`<state_dir>/budgets.json`), its validation,
and which calls a budget or limit covers.

The file is root's (`sudo llmtap budget|limit ...`, written with llmtap.atomic) and read by the
proxy worker (llmtap.addons.budgets), which re-reads it within a few seconds of a change. A rule
covers a call when every selector it has matches: `secret` the record's credential name,
`process` the attributed process's name, tool, exe path or exe file name, `model` the model asked
for or the one the reply names (a glob: `claude-haiku-4-5*` also covers the dated names replies
and past records carry), `user` the process's OS user. No selector covers every call.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmtap.errors import UsageError
from llmtap.formatting import money
from llmtap.parsers.base import as_dict

FILE_NAME = "budgets.json"
ACTIONS = ("block", "alert")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SELECTORS = ("secret", "process", "model", "user")
MAX_RULES = 256  # each is checked on every request
MAX_SELECTOR = 512


@dataclass(frozen=True)
class Selectors:
    secret: str | None = None
    process: str | None = None
    model: str | None = None
    user: str | None = None

    def needs_process(self) -> bool:
        return self.process is not None or self.user is not None

    def matches(self, call: Mapping[str, Any]) -> bool:
        """`call`: credential, model, process (the record's fields)."""
        if self.secret is not None and call.get("credential") != self.secret:
            return False
        if self.model is not None and not any(  # the model asked for, or the reply's name for it
                fnmatch.fnmatchcase(str(m), self.model)
                for m in (call.get("model"), call.get("requested_model")) if m):
            return False
        process = as_dict(call.get("process"))
        if self.user is not None and process.get("user") != self.user:
            return False
        return self.process is None or self.process in process_names(process)

    def describe(self) -> str:
        parts = [f"{k} {v}" for k, v in asdict(self).items() if v is not None]
        return ", ".join(parts) or "every call"


def process_names(process: Mapping[str, Any]) -> set[str]:
    """What a `process` selector may name: the name, the tool, the exe path and its file name."""
    names = {str(process[k]) for k in ("name", "tool", "exe") if process.get(k)}
    if process.get("exe"):
        names.add(os.path.basename(str(process["exe"])))
    return names


@dataclass(frozen=True)
class Budget:
    name: str
    daily: float | None = None  # USD per local day
    monthly: float | None = None  # USD per local calendar month
    action: str = "block"
    alert_at: float = 80.0  # percent of a cap
    where: Selectors = field(default_factory=Selectors)


@dataclass(frozen=True)
class Limit:
    name: str
    rpm: int | None = None  # calls admitted in any 60 s
    tpm: int | None = None  # tokens of calls completed in any 60 s
    where: Selectors = field(default_factory=Selectors)


@dataclass(frozen=True)
class Policy:
    budgets: tuple[Budget, ...] = ()
    limits: tuple[Limit, ...] = ()

    def to_json(self) -> bytes:
        def rule(item: Budget | Limit) -> dict[str, Any]:
            found = {k: v for k, v in asdict(item).items() if k != "where" and v is not None}
            return found | {k: v for k, v in asdict(item.where).items() if v is not None}
        data = {"version": 1, "budgets": [rule(b) for b in self.budgets],
                "limits": [rule(lim) for lim in self.limits]}
        return (json.dumps(data, indent=2) + "\n").encode()


def policy_path(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise UsageError(f"name {name!r}: use 1-64 letters, digits, '.', '_' or '-' "
                         "(first a letter or digit)")
    return name


def check_usd(value: float | None, option: str) -> float | None:
    if value is not None and (not math.isfinite(value) or value <= 0 or value > 1e9):
        raise UsageError(f"{option} must be an amount of USD above 0, not {value}")
    return value


def check_count(value: int | None, option: str) -> int | None:
    if value is not None and not 1 <= value <= 10_000_000:
        raise UsageError(f"{option} must be a whole number from 1 to 10000000, not {value}")
    return value


def selectors(**given: str | None) -> Selectors:
    for key, value in given.items():
        if value is not None and (not value.strip() or len(value) > MAX_SELECTOR
                                  or any(ord(c) < 32 for c in value)):
            raise UsageError(f"--{key} must be a non-empty printable value of at most "
                             f"{MAX_SELECTOR} characters")
    return Selectors(**given)


def budget(name: str, daily: float | None, monthly: float | None, action: str,
           alert_at: float, where: Selectors) -> Budget:
    check_name(name)
    if daily is None and monthly is None:
        raise UsageError("a budget needs --daily or --monthly (USD)")
    if action not in ACTIONS:
        raise UsageError(f"--action must be one of {', '.join(ACTIONS)}, not {action!r}")
    if not (math.isfinite(alert_at) and 1 <= alert_at <= 100):
        raise UsageError(f"--alert-at must be a percentage from 1 to 100, not {alert_at}")
    return Budget(name, check_usd(daily, "--daily"), check_usd(monthly, "--monthly"), action,
                  float(alert_at), where)


def limit(name: str, rpm: int | None, tpm: int | None, where: Selectors) -> Limit:
    check_name(name)
    if rpm is None and tpm is None:
        raise UsageError("a limit needs --rpm or --tpm")
    return Limit(name, check_count(rpm, "--rpm"), check_count(tpm, "--tpm"), where)


def parse_policy(raw: bytes) -> Policy:
    """The policy from the file's bytes; UsageError (one line) when it is not a valid one."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"{FILE_NAME} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{FILE_NAME} must hold a JSON object")
    budgets = [_rule(item, "budgets") for item in _list(data, "budgets")]
    limits = [_rule(item, "limits") for item in _list(data, "limits")]
    if len(budgets) + len(limits) > MAX_RULES:
        raise UsageError(f"{FILE_NAME}: more than {MAX_RULES} budgets and limits")
    return Policy(tuple(b for b in budgets if isinstance(b, Budget)),
                  tuple(lim for lim in limits if isinstance(lim, Limit)))


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise UsageError(f"{FILE_NAME}: {key} must be a list")
    return value


def _rule(item: Any, kind: str) -> Budget | Limit:
    if not isinstance(item, dict):
        raise UsageError(f"{FILE_NAME}: each of {kind} must be an object")
    try:
        where = selectors(**{k: item.get(k) for k in SELECTORS})
        name = str(item.get("name", ""))
        if kind == "limits":
            return limit(name, item.get("rpm"), item.get("tpm"), where)
        return budget(name, _num(item.get("daily")), _num(item.get("monthly")),
                      str(item.get("action", "block")), float(item.get("alert_at", 80.0)), where)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{FILE_NAME}: {kind}: {exc}") from None


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def load_policy(state_dir: Path) -> Policy:
    """The policy on disk; an absent file is an empty policy."""
    try:
        raw = policy_path(state_dir).read_bytes()
    except FileNotFoundError:
        return Policy()
    except OSError as exc:
        raise UsageError(f"cannot read {policy_path(state_dir)}: {exc.strerror}") from None
    return parse_policy(raw)


# -- their use, as `budget list`, `status` and the dashboard show it ----------------------------


def budget_line(row: dict[str, Any]) -> str:
    caps = []
    for cap, spent, period in ((row.get("daily"), row.get("spent_today"), "today"),
                               (row.get("monthly"), row.get("spent_month"), "this month")):
        if cap:
            caps.append(f"{money(spent)} of {money(cap)} {period} ({(spent or 0) / cap:.0%})")
    flying = row.get("in_flight")
    extra = f", {money(flying)} in flight" if flying else ""
    return (f"{row['name']}: {'; '.join(caps)}{extra} [{row.get('where')}; {row.get('action')}, "
            f"alert at {row.get('alert_at', 80):g}%]")


def limit_line(row: dict[str, Any]) -> str:
    used = []
    if row.get("rpm"):
        used.append(f"{row.get('calls_last_minute', 0)}/{row['rpm']} calls")
    if row.get("tpm"):
        used.append(f"{row.get('tokens_last_minute', 0)}/{row['tpm']} tokens")
    return f"{row['name']}: {', '.join(used)} in the last minute [{row.get('where')}]"


def policy_line(row: dict[str, Any]) -> str:
    """One budget's or limit's line in `llmtap status`."""
    return f"budget {budget_line(row)}" if row.get("kind") == "budget" else f"limit {limit_line(row)}"



# -- periods ------------------------------------------------------------------------------------


_day: list[Any] = [0.0, 0.0, ("", "")]  # [start, end, periods] of the day last asked about


def periods(timestamp: float) -> tuple[str, str]:
    """The local day and month a moment belongs to ("2026-12-02", "2026-12")."""
    start, end, found = _day
    if start <= timestamp < end:  # asked several times a call: the day changes rarely
        return found  # type: ignore[no-any-return]
    day = datetime.datetime.fromtimestamp(timestamp).date()
    found = day.isoformat(), day.isoformat()[:7]
    begin = datetime.datetime.combine(day, datetime.time()).timestamp()
    _day[:] = [begin, next_reset(timestamp), found]
    return found


def next_reset(timestamp: float, monthly: bool = False) -> float:
    """The local midnight after `timestamp` (of the next month's first day when `monthly`)."""
    day = datetime.datetime.fromtimestamp(timestamp).date()
    if monthly:
        after = (day.replace(day=1) + datetime.timedelta(days=32)).replace(day=1)
    else:
        after = day + datetime.timedelta(days=1)
    return datetime.datetime.combine(after, datetime.time()).timestamp()


def month_start(timestamp: float) -> float:
    day = datetime.datetime.fromtimestamp(timestamp).date().replace(day=1)
    return datetime.datetime.combine(day, datetime.time()).timestamp()
