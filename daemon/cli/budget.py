"""`llmtap budget set|list|rm` and `llmtap limit set|list|rm`: spending caps and rate limits.

They live in `<state_dir>/budgets.json`, root's file (they are policy: only root changes them),
replaced atomically; the running daemon applies a change within a few seconds. `list` shows the
spend so far from the daemon (with the estimates of calls in flight), or from the records index
when no daemon runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from llmtap import control
from llmtap.atomic import write_atomic
from llmtap.budgets import (
    Budget,
    Limit,
    Policy,
    budget,
    budget_line,
    check_name,
    limit,
    limit_line,
    load_policy,
    policy_path,
    selectors,
)
from llmtap.cli.options import ConfigOption
from llmtap.cli.secrets import service_owner
from llmtap.config import Config, load_config
from llmtap.errors import LlmtapError, RuntimeFailure, UsageError
from llmtap.formatting import money
from llmtap.privileges import require_root
from llmtap.spend import Ledger

try:
    import fcntl
except ImportError:  # Windows: one elevated writer at a time is the administrator's to ensure
    fcntl = None  # type: ignore[assignment]

budget_app = typer.Typer(no_args_is_help=True, help="Spending caps per day and month (USD).")
limit_app = typer.Typer(no_args_is_help=True, help="Rate limits: calls and tokens per minute.")
NameArg = typer.Argument(..., help="The budget's or limit's name.")
SecretOpt = typer.Option(None, "--secret", help="Only calls made with this secret (its name).")
ProcessOpt = typer.Option(None, "--process", help="Only calls from this process (name or exe path).")
ModelOpt = typer.Option(None, "--model", help="Only calls to this model (a glob: 'claude-*').")
UserOpt = typer.Option(None, "--user", help="Only calls from processes of this OS user.")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output.")


# -- the file -----------------------------------------------------------------------------------


def _read(settings: Config) -> Policy:
    try:
        return load_policy(settings.state_dir)
    except PermissionError:
        raise RuntimeFailure(f"cannot read {policy_path(settings.state_dir)}: run it with sudo") from None


@contextlib.contextmanager
def _changing(settings: Config, action: str) -> Iterator[list[Policy]]:
    """Root only: yields [policy] to replace, under a lock, and writes what it holds then."""
    require_root(action)
    state_dir = settings.state_dir
    if not state_dir.exists():
        owner = service_owner(settings, create=True)
        state_dir.mkdir(mode=0o700, parents=True)
        if hasattr(os, "chown"):
            os.chown(state_dir, owner.uid, owner.gid)  # the worker reads the state dir
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    lock = os.open(state_dir / ".budgets.lock", flags, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        held = [_read(settings)]
        yield held
        # root's file, readable by the worker (the state dir keeps everyone else out)
        write_atomic(policy_path(state_dir), held[0].to_json(), mode=0o644, durable=True)
    finally:
        os.close(lock)


def _replace[R: (Budget, Limit)](rules: tuple[R, ...], new: R) -> tuple[R, ...]:
    found = [new if r.name == new.name else r for r in rules]  # a changed one stays in its place
    if new not in found:
        found.append(new)
    return tuple(found)


# -- budget -------------------------------------------------------------------------------------


@budget_app.command("set")
def budget_set(
    name: str = NameArg,
    daily: float | None = typer.Option(None, "--daily", help="USD per local day."),
    monthly: float | None = typer.Option(None, "--monthly", help="USD per calendar month."),
    secret: str | None = SecretOpt, process: str | None = ProcessOpt,
    model: str | None = ModelOpt, user: str | None = UserOpt,
    action: str | None = typer.Option(None, "--action",
                                      help="block (429 once spent, the default) | alert (only tell)"),
    alert_at: float | None = typer.Option(None, "--alert-at",
                                          help="Alert at this % of a cap (default 80; and at 100%)."),
    config: str | None = ConfigOption,
) -> None:
    """Add a budget, or change the options given of an existing one. A call that could run
    over a `block` budget gets a 429."""
    settings = load_config(config)
    given = selectors(secret=secret, process=process, model=model, user=user)
    with _changing(settings, "llmtap budget set") as held:
        old = next((b for b in held[0].budgets if b.name == name), None) or Budget(name)
        where = dataclasses.replace(old.where, **{k: v for k, v in dataclasses.asdict(given).items()
                                                  if v is not None})
        new = budget(name, _given(daily, old.daily), _given(monthly, old.monthly),
                     _given(action, old.action), _given(alert_at, old.alert_at), where)
        held[0] = dataclasses.replace(held[0], budgets=_replace(held[0].budgets, new))
    caps = ", ".join(f"{money(v)} {k}" for k, v in (("a day", new.daily), ("a month", new.monthly)) if v)
    typer.echo(f"budget {name}: {caps} for {new.where.describe()}, action {new.action}, alert at "
               f"{new.alert_at:g}%")


def _given[T](value: T | None, old: T) -> T:
    return old if value is None else value


@budget_app.command("rm")
def budget_rm(name: str = NameArg, config: str | None = ConfigOption) -> None:
    """Remove a budget."""
    _remove(load_config(config), "budget", name)


@budget_app.command("list")
def budget_list(as_json: bool = JsonOpt, config: str | None = ConfigOption) -> None:
    """Budgets with their spend today and this month (and in flight, from the daemon)."""
    _list(load_config(config), "budget", as_json, budget_line, "--daily USD")


# -- limit --------------------------------------------------------------------------------------


@limit_app.command("set")
def limit_set(
    name: str = NameArg,
    rpm: int | None = typer.Option(None, "--rpm", help="Calls in any 60 seconds."),
    tpm: int | None = typer.Option(None, "--tpm", help="Tokens (of completed calls) in any 60 s."),
    secret: str | None = SecretOpt, process: str | None = ProcessOpt,
    model: str | None = ModelOpt, user: str | None = UserOpt,
    config: str | None = ConfigOption,
) -> None:
    """Add a rate limit, or change the options given of an existing one; a call over it gets a
    429 with retry-after."""
    settings = load_config(config)
    given = selectors(secret=secret, process=process, model=model, user=user)
    with _changing(settings, "llmtap limit set") as held:
        old = next((lim for lim in held[0].limits if lim.name == name), None) or Limit(name)
        where = dataclasses.replace(old.where, **{k: v for k, v in dataclasses.asdict(given).items()
                                                  if v is not None})
        new = limit(name, _given(rpm, old.rpm), _given(tpm, old.tpm), where)
        held[0] = dataclasses.replace(held[0], limits=_replace(held[0].limits, new))
    rates = ", ".join(f"{v} {k}" for k, v in (("rpm", new.rpm), ("tpm", new.tpm)) if v)
    typer.echo(f"limit {name}: {rates} for {new.where.describe()}")


@limit_app.command("rm")
def limit_rm(name: str = NameArg, config: str | None = ConfigOption) -> None:
    """Remove a rate limit."""
    _remove(load_config(config), "limit", name)


@limit_app.command("list")
def limit_list(as_json: bool = JsonOpt, config: str | None = ConfigOption) -> None:
    """Rate limits with their use in the last minute (from the daemon)."""
    _list(load_config(config), "limit", as_json, limit_line, "--rpm N")


def _remove(settings: Config, kind: str, name: str) -> None:
    """`budget rm` and `limit rm`: the rule of that kind and name goes, or one line says there is none."""
    field = f"{kind}s"  # Policy.budgets or Policy.limits
    with _changing(settings, f"llmtap {kind} rm") as held:
        rules = getattr(held[0], field)
        if not any(rule.name == check_name(name) for rule in rules):
            raise UsageError(f"no {kind} {name!r} (see `llmtap {kind} list`)")
        held[0] = dataclasses.replace(held[0], **{field: tuple(r for r in rules if r.name != name)})
    typer.echo(f"{kind} {name} removed")


def _list(settings: Config, kind: str, as_json: bool, line: Callable[[dict[str, Any]], str],
          example: str) -> None:
    rows = [r for r in _usage(settings) if r["kind"] == kind]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no {kind}s (add one with `sudo llmtap {kind} set NAME {example}`)")
    for row in rows:
        typer.echo(line(row))


# -- use -----------------------------------------------------------------------------------------


def _usage(settings: Config) -> list[dict[str, Any]]:
    """The daemon's view (spend, in flight, the last minute), else the file and the index."""
    with contextlib.suppress(LlmtapError):
        report = control.request(settings.control_socket, {"cmd": "status"})
        if report and report.get("running"):
            return list(report.get("counters", {}).get("policy") or [])
    return offline_usage(settings, _read(settings), time.time())


def offline_usage(settings: Config, policy: Policy, now: float) -> list[dict[str, Any]]:
    ledger = Ledger()
    with contextlib.suppress(OSError):
        ledger.load_index(Path(settings.records_dir), now)
    rows: list[dict[str, Any]] = []
    for b in policy.budgets:
        today, month = ledger.spent(b, now)
        rows.append({"kind": "budget", "name": b.name, "daily": b.daily, "monthly": b.monthly,
                     "action": b.action, "alert_at": b.alert_at, "where": b.where.describe(),
                     "spent_today": round(today, 6), "spent_month": round(month, 6),
                     "in_flight": None})
    rows += [{"kind": "limit", "name": lim.name, "rpm": lim.rpm, "tpm": lim.tpm,
              "where": lim.where.describe()} for lim in policy.limits]
    return rows


def register(root: typer.Typer) -> None:
    root.add_typer(budget_app, name="budget")
    root.add_typer(limit_app, name="limit")
