"""`llmtap rules add|list|show|enable|disable|rm|move|test`: the request filter rules.

Rules are stored in state_dir/rules.db; the running daemon picks up every change at its next
request, without a restart. Writing needs root (the file belongs to the service user).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import typer
from llmtap.cli.options import ConfigOption
from llmtap.cli.secrets import require_writer, service_owner
from llmtap.config import Config, load_config
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.rules import Body, Protected, Rule, RuleError, RuleSet, RuleStore, db_path, validate
from llmtap.rules.model import DEFAULT_PRIORITY, SENSITIVE_HEADERS

rules_app = typer.Typer(no_args_is_help=True, help="Request filter rules (applied before DLP).")
RuleId = typer.Argument(..., help="The rule's id (see `llmtap rules list`).")
_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/\d(?:\.\d)?\r?\n")


def _store(settings: Config, write: bool, action: str) -> RuleStore:
    path = db_path(settings.state_dir)
    if not write:
        return RuleStore(path)
    owner = service_owner(settings, create=True)
    require_writer(owner, action)
    if not settings.state_dir.exists():
        settings.state_dir.mkdir(mode=0o700, parents=True)
        if os.geteuid() == 0:
            os.chown(settings.state_dir, owner.uid, owner.gid)
    return RuleStore(path, owner=(owner.uid, owner.gid) if os.geteuid() == 0 else None)


def _run(store: RuleStore, operation: str, *args: Any) -> Any:
    """A store operation, with its failures as one-line errors."""
    try:
        return getattr(store, operation)(*args)
    except PermissionError:
        raise RuntimeFailure(f"cannot open {store.path}: permission denied (run with sudo)") from None
    except (sqlite3.Error, OSError) as exc:
        raise RuntimeFailure(f"rules database {store.path}: {exc}") from None


def _get(store: RuleStore, rule_id: int) -> Rule:
    rule = _run(store, "get", rule_id)
    if rule is None:
        raise UsageError(f"no rule {rule_id} (see `llmtap rules list`)")
    assert isinstance(rule, Rule)
    return rule


def _as_json(rule: Rule) -> dict[str, Any]:
    return {"id": rule.id, "priority": rule.priority, "enabled": rule.enabled, "scope": rule.scope,
            "action": rule.action, "match": rule.match, "target": rule.target,
            "pattern": rule.pattern, "replacement": rule.shown_replacement(),
            "description": rule.description, "hosts": list(rule.hosts), "paths": list(rule.paths),
            "created_at": rule.created_at}


def _where(rule: Rule) -> str:
    parts = [*(f"host {h}" for h in rule.hosts), *(f"path {p}" for p in rule.paths)]
    return ", ".join(parts) or "all requests"


@rules_app.command("add")
def add(
    scope: str = typer.Option(..., "--scope", help="header | body"),
    action: str = typer.Option(..., "--action", help="remove | set (header); json_path | "
                               "text_replace (body)"),
    target: str = typer.Option(..., "--target", help="Header name, JSON path, or text/regex."),
    match: str = typer.Option("exact", "--match", help="exact | contains | regex"),
    replacement: str = typer.Option("", "--replacement", help="The new value or text."),
    pattern: str = typer.Option("", "--pattern", help="json_path: what to replace in the value "
                                "(empty: the whole value)."),
    priority: int = typer.Option(DEFAULT_PRIORITY, "--priority", help="Lower runs first; equal "
                                 "priorities run in creation order."),
    description: str = typer.Option("", "--description", help="What the rule is for."),
    host: list[str] | None = typer.Option(None, "--host", help="Only for this host (glob; "
                                          "repeatable)."),
    path: list[str] | None = typer.Option(None, "--path", help="Only for this path (glob or "
                                          "prefix; repeatable)."),
    disabled: bool = typer.Option(False, "--disabled", help="Store it disabled."),
    config: str | None = ConfigOption,
) -> None:
    """Add a rule. Regexes are RE2: a pattern RE2 cannot run is refused with the reason."""
    settings = load_config(config)
    draft = Rule(scope, action, match, target, replacement, pattern, priority, not disabled,
                 description, tuple(host or ()), tuple(path or ()))
    try:
        rule = validate(draft)
    except RuleError as exc:
        raise UsageError(str(exc)) from None
    stored = _run(_store(settings, True, "llmtap rules add"), "add", rule)
    typer.echo(f"added rule {stored.id}: {stored.summary()}"
               + ("" if stored.enabled else " (disabled)"))


@rules_app.command("list")
def list_rules(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config: str | None = ConfigOption,
) -> None:
    """The rules, in the order they run."""
    rules: list[Rule] = _run(_store(load_config(config), False, ""), "all")
    if as_json:
        typer.echo(json.dumps([_as_json(r) for r in rules], indent=2, ensure_ascii=False))
        return
    if not rules:
        typer.echo("no rules (add one with `llmtap rules add`)")
        return
    rows = [("ID", "PRIO", "STATE", "RULE", "APPLIES TO", "DESCRIPTION")]
    rows += [(str(r.id), str(r.priority), "on" if r.enabled else "off", r.summary(), _where(r),
              r.description) for r in rules]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        typer.echo("  ".join([*cells, row[-1]]).rstrip())


@rules_app.command("show")
def show(
    rule_id: int = RuleId,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config: str | None = ConfigOption,
) -> None:
    """Every field of one rule."""
    fields = _as_json(_get(_store(load_config(config), False, ""), rule_id))
    if as_json:
        typer.echo(json.dumps(fields, indent=2, ensure_ascii=False))
        return
    for key, value in fields.items():
        typer.echo(f"{key + ':':<13} {', '.join(value) if isinstance(value, list) else value}")


def _set_enabled(rule_id: int, enabled: bool, config: str | None) -> None:
    verb = "enable" if enabled else "disable"
    store = _store(load_config(config), True, f"llmtap rules {verb}")
    _get(store, rule_id)
    _run(store, "set_enabled", rule_id, enabled)
    typer.echo(f"rule {rule_id} {verb}d")


@rules_app.command("enable")
def enable(rule_id: int = RuleId, config: str | None = ConfigOption) -> None:
    """Turn a rule on."""
    _set_enabled(rule_id, True, config)


@rules_app.command("disable")
def disable(rule_id: int = RuleId, config: str | None = ConfigOption) -> None:
    """Turn a rule off (it stays stored)."""
    _set_enabled(rule_id, False, config)


@rules_app.command("rm")
def remove(rule_id: int = RuleId, config: str | None = ConfigOption) -> None:
    """Delete a rule."""
    store = _store(load_config(config), True, "llmtap rules rm")
    _get(store, rule_id)
    _run(store, "remove", rule_id)
    typer.echo(f"removed rule {rule_id}")


@rules_app.command("move")
def move(
    rule_id: int = RuleId,
    priority: int = typer.Argument(..., help="The new priority (lower runs first)."),
    config: str | None = ConfigOption,
) -> None:
    """Give a rule a new priority; among equal priorities, older rules run first."""
    store = _store(load_config(config), True, "llmtap rules move")
    _get(store, rule_id)
    _run(store, "set_priority", rule_id, priority)
    order = [r.id for r in _run(store, "all") if r.enabled]
    position = f", runs {order.index(rule_id) + 1} of {len(order)}" if rule_id in order else ""
    typer.echo(f"rule {rule_id} now has priority {priority}{position}")


# --- rules test ---


def read_request(file: Path, host: str | None, path: str | None) -> tuple[str, str, str, list[
        tuple[str, str]], bytes]:
    """(method, host, path, headers, body) from an HTTP/1 request file or a bare body."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise UsageError(f"--request {file}: {exc.strerror}") from None
    first = _REQUEST_LINE.match(data)
    if first is None:
        headers = [("content-type", "application/json")]
        return "POST", host or "", path or "/", headers, data
    head, _, body = data[first.end():].replace(b"\r\n", b"\n").partition(b"\n\n")
    headers = []
    for line in head.decode("latin-1").splitlines():
        name, colon, value = line.partition(":")
        if not colon:
            raise UsageError(f"--request {file}: header line {line!r} has no ':'")
        headers.append((name.strip(), value.strip()))
    host = host or next((v for n, v in headers if n.lower() == "host"), "")
    return first.group(1).decode(), host, path or first.group(2).decode(), headers, body


def _lines(headers: Any, body: bytes) -> list[str]:
    lines = [f"{name}: {'****' if name.lower() in SENSITIVE_HEADERS else value}"
             for name, value in headers.items(multi=True)]
    parsed = Body.parse(body, "") if body else None
    if isinstance(parsed, Body) and parsed.kind == "json":
        text = json.dumps(parsed.document, indent=2, ensure_ascii=False)
    else:
        text = body.decode("utf-8", "replace")
    return [*lines, "", *text.splitlines()]


@rules_app.command("test")
def test(
    request_file: Path = typer.Option(..., "--request", help="An HTTP/1 request (request line, "
                                      "headers, blank line, body) or just a JSON body."),
    host: str | None = typer.Option(None, "--host", help="The host it goes to (default: its Host "
                                    "header)."),
    path: str | None = typer.Option(None, "--path", help="The request path (default: from the "
                                    "request line, else /)."),
    config: str | None = ConfigOption,
) -> None:
    """Show, as a diff, what the current rules would do to a request, and which rules hit."""
    from mitmproxy.http import Headers  # the daemon's header type; only this command needs it

    settings = load_config(config)
    rules = _run(_store(settings, False, ""), "all")
    _, host, req_path, header_list, body = read_request(request_file, host, path)
    headers = Headers([(n.encode(), v.encode()) for n, v in header_list])
    before = _lines(headers, body)
    ruleset = RuleSet(rules, Protected(settings.rules.all_protected_fields))
    content_type = headers.get("content-type", "")
    outcome, parsed = ruleset.run(headers, host, req_path,
                                  loader=lambda: Body.parse(body, content_type) if body else None)
    after_body = parsed.serialize() if parsed is not None and parsed.changed else body
    diff = list(difflib.unified_diff(before, _lines(headers, after_body), "request",
                                     "request after rules", lineterm=""))
    typer.echo("\n".join(diff) if diff else "no rule changes this request")
    for entry in outcome.rules_hit:
        typer.echo(f"hit  rule {entry['id']}: {'; '.join(entry['changes'])}")
    for entry in outcome.misses:
        typer.echo(f"miss rule {entry['id']}: {entry['reason']}")
    for rule, reason in ruleset.skipped:
        typer.echo(f"skipped rule {rule.id}: {reason}")


def register(root: typer.Typer) -> None:
    root.add_typer(rules_app, name="rules")
