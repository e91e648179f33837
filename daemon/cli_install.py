"""CLI: `install`, `uninstall`, `doctor` and `ca rotate` (registered in cli.py).

The heavy modules are imported inside the commands: every other command starts faster for it.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from llmtap.cli_options import ConfigOption
from llmtap.config import Config, load_config


def installer_for(config: Config, explicit: str | None, platform: str | None = None) -> Any:
    """llmtap.installer's Installer, or its Windows counterpart (no service user, icacls,
    certutil, setx, the Windows service)."""
    if (platform or sys.platform) == "win32":
        from llmtap.installer_windows import WindowsInstaller

        return WindowsInstaller(config, explicit, report=typer.echo)
    from llmtap.installer import Installer

    return Installer(config, explicit, report=typer.echo)


def install(
    no_service: bool = typer.Option(False, "--no-service", help="Do not install or start the service."),
    no_trust: bool = typer.Option(False, "--no-trust", help="Do not add the CA to any trust store."),
    config: str | None = ConfigOption,
) -> None:
    """User, directories, CA, OS trust, runtime environment and the service (started). Idempotent;
    a failure rolls back every step done."""
    installer_for(load_config(config), config).install(trust=not no_trust, service=not no_service)


def uninstall(
    purge: bool = typer.Option(False, "--purge", help="Also delete the CA, secrets, records, "
                               "the config install wrote and the service user."),
    config: str | None = ConfigOption,
) -> None:
    """Stops and removes the service, the rules, the CA's trust and the environment file."""
    installer_for(load_config(config), config).uninstall(purge=purge)


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


def ca_rotate(config: str | None = ConfigOption) -> None:
    """Issues a new CA for the current targets, trusts it where the old one was, removes the old."""
    installer_for(load_config(config), config).rotate()
