"""`llmtap ca path|rotate`: llmtap's certificate authority."""

from __future__ import annotations

import typer
from llmtap.cli.install import installer_for
from llmtap.cli.options import ConfigOption
from llmtap.config import load_config

ca_app = typer.Typer(no_args_is_help=True, help="llmtap's certificate authority.")


@ca_app.command("path")
def ca_path(config: str | None = ConfigOption) -> None:
    """Print the path of the CA certificate (PEM, no key)."""
    from llmtap.ca import public_cert_path

    typer.echo(str(public_cert_path(load_config(config).ca_dir)))


@ca_app.command("rotate")
def ca_rotate(config: str | None = ConfigOption) -> None:
    """Issues a new CA for the current targets, trusts it where the old one was, removes the old."""
    installer_for(config).rotate()


def register(root: typer.Typer) -> None:
    root.add_typer(ca_app, name="ca")
