"""`llmtap install`, `uninstall` and `doctor`: this OS's installer (llmtap.install) and its checks.

The heavy modules are imported inside the commands: every other command starts faster for it.
"""

from __future__ import annotations

import typer
from llmtap.cli.options import ConfigOption
from llmtap.config import load_config
from llmtap.install import provider_for
from llmtap.install.engine import Provider


def installer_for(config: str | None) -> Provider:
    """This OS's installer (llmtap.install picks it), reporting on the terminal."""
    return provider_for(load_config(config), config, report=typer.echo)


def install(
    no_service: bool = typer.Option(False, "--no-service", help="Do not install or start the service."),
    no_trust: bool = typer.Option(False, "--no-trust", help="Do not add the CA to any trust store."),
    config: str | None = ConfigOption,
) -> None:
    """User, directories, CA, OS trust, runtime environment and the service (started). Idempotent;
    a failure rolls back every step done."""
    installer_for(config).install(trust=not no_trust, service=not no_service)


def uninstall(
    purge: bool = typer.Option(False, "--purge", help="Also delete the CA, secrets, records, "
                               "the config install wrote and the service user."),
    config: str | None = ConfigOption,
) -> None:
    """Stops and removes the service, the rules, the CA's trust and the environment file."""
    installer_for(config).uninstall(purge=purge)


def doctor(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    host: str | None = typer.Option(None, "--host", help="Target to handshake with."),
    config: str | None = ConfigOption,
) -> None:
    """Checks the service, rules, DNS, the CA's trust, and each runtime by a real handshake."""
    from llmtap.doctor import Doctor, render
    from llmtap.doctor import as_json as to_json

    checks = Doctor(load_config(config), config, host=host).run()
    typer.echo(to_json(checks) if as_json else render(checks))
    if any(check.status == "fail" for check in checks):
        raise typer.Exit(1)


def register(root: typer.Typer) -> None:
    for command in (install, uninstall, doctor):
        root.command()(command)
