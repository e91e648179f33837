"""The `llmtap` command line. Every error a user can cause is one line and an exit code."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer
from llmtap import __version__, cli_install, control, redirect
from llmtap.cli_history import history_app
from llmtap.cli_options import ConfigOption
from llmtap.cli_prices import prices_app
from llmtap.cli_rules import rules_app
from llmtap.cli_secrets import env_command, secrets_app
from llmtap.cli_tunnel import tunnel_command
from llmtap.cli_ui import ui_command
from llmtap.config import Config, load_config
from llmtap.errors import LlmtapError
from llmtap.platform.linux import gateway
from llmtap.privileges import require_root

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="See, secure and account for every LLM API call on this machine.",
)
ca_app = typer.Typer(no_args_is_help=True, help="llmtap's certificate authority.")
app.add_typer(ca_app, name="ca")
app.command()(cli_install.install)
app.command()(cli_install.uninstall)
app.command()(cli_install.doctor)
ca_app.command("rotate")(cli_install.ca_rotate)
app.add_typer(history_app)  # logs, show, stats, export, reindex, dashboard: top-level commands
app.add_typer(prices_app, name="prices")
app.add_typer(rules_app, name="rules")
app.add_typer(secrets_app, name="secrets")
app.command("env")(env_command)
app.command("tunnel")(tunnel_command)
app.command("ui")(ui_command)



@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


@app.command()
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


@app.command()
def cleanup(config: str | None = ConfigOption) -> None:
    """Remove any llmtap redirect rules left on this machine. Safe to run any time."""
    settings = load_config(config)  # a bad config is reported even here, where nothing else needs it
    require_root("llmtap cleanup")
    removed = redirect.cleanup_all()
    if gateway.restore(gateway.record_path(settings.run_dir)):
        removed.append("route_localnet")
    typer.echo(f"removed llmtap rules ({', '.join(removed)})" if removed else "no llmtap rules found")


@app.command()
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
    counters = report.get("counters", {})
    typer.echo("  " + ", ".join(f"{k} {v}" for k, v in counters.items()))


@ca_app.command("path")
def ca_path(config: str | None = ConfigOption) -> None:
    """Print the path of the CA certificate (PEM, no key)."""
    from llmtap.ca import public_cert_path

    typer.echo(str(public_cert_path(load_config(config).ca_dir)))


def main(argv: list[str] | None = None) -> int:
    """Click reports usage errors itself (exit 2); ours are one line with their exit code."""
    try:
        app(args=argv)
    except LlmtapError as exc:
        print(f"llmtap: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
