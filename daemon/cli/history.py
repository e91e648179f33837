"""History commands: logs, show, stats, export and reindex.

They read the records directory (root or members of group llmtap). `--read-only` changes nothing
at all, not even SQLite's side files: for reading a copied archive or someone else's tree.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import typer
from llmtap.cli.options import ConfigOption
from llmtap.config import Config, load_config
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.formatting import local_time, millis, money, printable, tokens
from llmtap.records import store
from llmtap.records.index import Index, index_path

history_app = typer.Typer()

ReadOnlyOption = typer.Option(False, "--read-only", help="Change nothing on disk (read an archive).")
SinceOption = typer.Option(None, "--since", help="Only calls since: 30m, 1h, 2d, 1w or a date/time.")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
BY_CHOICES = ("model", "process", "host", "day", "budget")


def parse_since(value: str | None, now: float | None = None) -> float | None:
    """A Unix time from `1h`/`2d`/... (ago) or an ISO date/time (UTC if no zone)."""
    if not value:
        return None
    now = time.time() if now is None else now
    if match := _DURATION.match(value.strip().lower()):
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        moment = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {value!r}: use 30m, 1h, 2d, 1w or a date such as 2025-01-31") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def open_index(config: Config, read_only: bool) -> Index:
    directory = config.records_dir
    if not directory.exists():
        raise RuntimeFailure(f"no records yet: {directory} does not exist")
    try:
        return Index.open_reader(directory, read_only)
    except PermissionError:
        raise RuntimeFailure(f"cannot read {directory}: run as root or join group llmtap") from None
    except (OSError, sqlite3.Error) as exc:
        raise RuntimeFailure(f"cannot read the records in {directory}: {exc}") from None


def process_label(row: Any) -> str:
    name = row["process_tool"] or row["process_name"]
    if name and row["process_name"] and row["process_tool"] and row["process_tool"] != row["process_name"]:
        name = f"{row['process_tool']}/{row['process_name']}"
    return f"{name}[{row['process_pid']}]" if name else "?"


def log_line(row: Any) -> str:
    usage = f"{tokens(row['input_tokens'])}→{tokens(row['output_tokens'])}"
    error = f"  ! {row['error'][:80]}" if row["error"] else ""
    if row["counted"] == 0:  # a retrieval, a poll, an upgrade: no call of its own
        error = f"  (not counted{': repeat of ' + row['repeat_of'] if row['repeat_of'] else ''})" + error
    return printable(
        f"{local_time(row['started_ts'])}  {row['id'][:8]}  {process_label(row):<22} "
        f"{(row['model'] or '?'):<28} {row['status'] if row['status'] is not None else '---'}  "
        f"{usage:>13}  {money(row['cost_usd']):>9}  ttft {millis(row['ttft_ms']):>7}  "
        f"{row['host']}{row['path'] or ''}{error}")


def json_row(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in row.keys() if k != "rowid"}  # noqa: SIM118 - a sqlite3.Row


@history_app.command()
def logs(
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new calls."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    since: str | None = SinceOption,
    model: str | None = typer.Option(None, "--model", help="Only models containing this."),
    process: str | None = typer.Option(None, "--process", help="Only processes/tools named so."),
    limit: int = typer.Option(50, "--limit", "-n", help="The newest N calls (0: all)."),
    read_only: bool = ReadOnlyOption,
    config: str | None = ConfigOption,
) -> None:
    """The calls, oldest first (the newest --limit)."""
    settings = load_config(config)
    since_ts = parse_since(since)
    index = open_index(settings, read_only)
    last = 0
    rows = index.calls(since_ts, model, process, limit=limit or None)
    while True:
        for row in rows:
            typer.echo(json.dumps(json_row(row)) if as_json else log_line(row))
            last = max(last, row["rowid"])
        sys.stdout.flush()
        if not follow:
            return
        time.sleep(0.5)
        last = last or index.max_rowid()
        rows = index.calls(since_ts, model, process, after_rowid=last)


@history_app.command()
def show(
    record_id: str = typer.Argument(..., metavar="ID", help="A record id (or a unique prefix)."),
    as_json: bool = typer.Option(False, "--json", help="The JSON record instead of the Markdown."),
    read_only: bool = ReadOnlyOption,
    config: str | None = ConfigOption,
) -> None:
    """One call: its Markdown twin (request and response, auth masked), or --json its record."""
    settings = load_config(config)
    if len(record_id) < 4:
        raise UsageError("ID: give at least 4 characters of the record id")
    matches = open_index(settings, read_only).find(record_id)
    if not matches:
        raise RuntimeFailure(f"no record {record_id!r} (try `llmtap logs`)")
    if len(matches) > 1:
        raise UsageError(f"ID {record_id!r} is ambiguous: " + ", ".join(m["id"] for m in matches))
    location = matches[0]["location"]
    if store.read_location(settings.records_dir, location) is None:  # a stale index: look around
        location = store.find_location(settings.records_dir, matches[0]["id"]) or location
    wanted = location if as_json else store.markdown_location(location)
    data = store.read_location(settings.records_dir, wanted)
    if data is None and not as_json:
        data = store.read_location(settings.records_dir, location)
    if data is None:
        raise RuntimeFailure(f"record {matches[0]['id']} is indexed but its file {location} is gone "
                             "(run `llmtap reindex`)")
    typer.echo(printable(data.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n")))


@history_app.command()
def stats(
    by: str = typer.Option("model", "--by", help="Group by model, process, host, day or budget."),
    since: str | None = SinceOption,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    read_only: bool = ReadOnlyOption,
    config: str | None = ConfigOption,
) -> None:
    """Calls, tokens by kind, cost and p50/p95 time to first token, grouped."""
    if by not in BY_CHOICES:
        raise UsageError(f"--by must be one of {', '.join(BY_CHOICES)}, not {by!r}")
    settings = load_config(config)
    since_ts = parse_since(since)
    index = open_index(settings, read_only)
    groups, unpriced = index.stats(by, since_ts), index.unpriced(since_ts)
    not_counted = index.not_counted(since_ts)
    if as_json:
        typer.echo(json.dumps({"by": by, "groups": groups, "unpriced": unpriced,
                               "not_counted": not_counted}, indent=2))
        return
    print_stats(by, groups, unpriced, not_counted)


def print_stats(by: str, groups: list[dict[str, Any]], unpriced: list[dict[str, Any]],
                not_counted: int = 0) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"llmtap calls by {by}")
    for title in (by, "calls", "input", "output", "cache read", "cache write", "reasoning",
                  "cost", "ttft p50", "ttft p95"):
        table.add_column(title, justify="left" if title == by else "right")
    for g in groups:
        writes = _sum(g["cache_write_5m_tokens"], g["cache_write_1h_tokens"])
        cost = money(g["cost_usd"]) + ("*" if g["unpriced"] else "")
        table.add_row(str(g["key"] or "?"), str(g["calls"]), tokens(g["input_tokens"]),
                      tokens(g["output_tokens"]), tokens(g["cache_read_tokens"]), tokens(writes),
                      tokens(g["reasoning_tokens"]), cost, millis(g["ttft_p50_ms"]),
                      millis(g["ttft_p95_ms"]))
    console = Console(width=max(120, Console().width))
    console.print(table)
    total = sum(g["unpriced"] or 0 for g in groups)
    if total:
        by_model: dict[str, int] = {}
        for u in unpriced:  # per model and host: one line says it per model
            by_model[u["model"]] = by_model.get(u["model"], 0) + u["calls"]
        if total > sum(by_model.values()):
            by_model["?"] = total - sum(by_model.values())  # tokens, but no model named
        models = ", ".join(f"{model} ({calls})" for model, calls in by_model.items())
        console.print(f"* unpriced: {total} call{'s' if total != 1 else ''} (models: {models}): "
                      "tokens used, no price known, not in the cost")
    if not_counted:
        console.print(f"not counted: {not_counted} record{'s' if not_counted != 1 else ''} "
                      "(retrievals, polls, repeat downloads, WebSocket upgrades, listings: no "
                      "call, no cost)")


def _sum(*values: Any) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


@history_app.command()
def export(
    fmt: str = typer.Option("jsonl", "--format", help="jsonl (whole records) or csv (index columns)."),
    since: str | None = SinceOption,
    output: str | None = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
    read_only: bool = ReadOnlyOption,
    config: str | None = ConfigOption,
) -> None:
    """Every call (since --since) as JSON lines or CSV."""
    if fmt not in ("jsonl", "csv"):
        raise UsageError(f"--format must be jsonl or csv, not {fmt!r}")
    settings = load_config(config)
    rows = open_index(settings, read_only).calls(parse_since(since))
    try:
        out = open(output, "w", newline="", encoding="utf-8") if output else sys.stdout  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"--output {output}: {exc.strerror}") from None
    try:
        if fmt == "csv":
            writer = csv.writer(out)
            names = [k for k in rows[0].keys() if k != "rowid"] if rows else []  # noqa: SIM118
            writer.writerow(names)
            writer.writerows([[row[k] for k in names] for row in rows])
        else:
            for row in rows:
                data = store.read_location(settings.records_dir, row["location"])
                record = json.loads(data) if data else json_row(row)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if output:
            out.close()


@history_app.command()
def reindex(config: str | None = ConfigOption) -> None:
    """Rebuild the SQLite index from the record files (safe while the daemon runs)."""
    settings = load_config(config)
    directory = settings.records_dir
    if not directory.is_dir():
        raise RuntimeFailure(f"{directory} does not exist")
    path = index_path(directory)
    existed = path.exists()
    try:
        index = Index.open_writer(path)
        count = index.rebuild(directory)
        index.close()
    except PermissionError:
        raise RuntimeFailure(f"cannot write {path}: run as root or as the service user") from None
    except (OSError, sqlite3.Error) as exc:
        raise RuntimeFailure(f"cannot rebuild {path}: {exc}") from None
    if not existed and os.geteuid() == 0:  # the daemon (service user) must keep writing to it
        owner = directory.stat()
        for side in ("", "-wal", "-shm"):
            target = Path(f"{path}{side}")
            if target.exists():
                os.chown(target, owner.st_uid, owner.st_gid)
    typer.echo(f"indexed {count} records from {directory}")


def register(root: typer.Typer) -> None:
    root.add_typer(history_app)  # logs, show, stats, export, reindex: top-level commands
