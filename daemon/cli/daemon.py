"""`llmtap run`, `status` and `cleanup`: the daemon in the foreground, what it is doing, and
what an earlier run left behind."""

from __future__ import annotations

import json
import os
from typing import Any

import typer
from llmtap import control, redirect
from llmtap.budgets import policy_line
from llmtap.cli.options import ConfigOption
from llmtap.config import Config, load_config
from llmtap.platform.linux import gateway
from llmtap.privileges import require_root


def run(
    config: str | None = ConfigOption,
    bare: bool = typer.Option(False, "--bare", hidden=True,
                              help="No pipeline: the bare mitmproxy of the benchmarks."),
) -> None:
    """Run the daemon in the foreground until SIGINT/SIGTERM, then remove everything it added."""
    if not hasattr(os, "fork"):  # Windows: the proxy runs in this process
        from llmtap.platform.windows import inprocess

        raise typer.Exit(inprocess.run(load_config(config), bare))
    from llmtap import supervisor  # imports mitmproxy: only the daemon pays for it

    raise typer.Exit(supervisor.run(load_config(config), bare))


def cleanup(config: str | None = ConfigOption) -> None:
    """Remove any llmtap redirect rules left on this machine. Safe to run any time."""
    settings = load_config(config)  # a bad config is reported even here, where nothing else needs it
    require_root("llmtap cleanup")
    removed = redirect.cleanup_all()
    if gateway.restore(gateway.record_path(settings.run_dir)):
        removed.append("route_localnet")
    typer.echo(f"removed llmtap rules ({', '.join(removed)})" if removed else "no llmtap rules found")


def status(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config: str | None = ConfigOption,
) -> None:
    """Daemon health, backend, rules, resolved targets and counters."""
    settings = load_config(config)
    report = control.request(settings.control_socket, {"cmd": "status"}) or _offline(settings)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_status(report)


def _offline(settings: Config) -> dict[str, Any]:
    from llmtap.supervisor import offline_status

    return offline_status(settings)


def _print_status(report: dict[str, Any]) -> None:
    if not report.get("running"):
        rules = "leftover rules present (run `sudo llmtap cleanup`)" if report.get(
            "rules_present") else "no rules present"
        typer.echo(f"llmtap is not running; {rules}")
        return
    typer.echo(f"llmtap is running (pid {report['pid']}, since {report['started_at']})")
    typer.echo(f"  redirect: {report['backend']}, scope {report['scope']}, ports "
               f"{','.join(map(str, report['ports']))} -> {report['proxy_port']}, "
               f"rules {'present' if report['rules_present'] else 'MISSING'}")
    typer.echo(f"  listening: {', '.join(report['listening'])}")
    if report.get("gateway_interfaces"):
        typer.echo(f"  gateway: traffic forwarded from {', '.join(report['gateway_interfaces'])}")
    if report.get("metrics"):
        typer.echo(f"  metrics: http://{report['metrics']}/metrics and /health")
    for host, addresses in report["targets"].items():
        typer.echo(f"  {host}: {', '.join(addresses) or 'unresolved'}")
    counters = dict(report.get("counters", {}))
    policy = counters.pop("policy", None) or []
    typer.echo("  " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    for row in policy:  # budgets and rate limits with their use
        typer.echo(f"  {policy_line(row)}")


def register(root: typer.Typer) -> None:
    for command in (run, status, cleanup):
        root.command()(command)
