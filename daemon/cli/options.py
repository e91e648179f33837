"""Options every command module shares, defined once."""

from __future__ import annotations

import typer
from llmtap.config import DEFAULT_CONFIG_PATH

ConfigOption = typer.Option(None, "--config", help=f"Config file (default {DEFAULT_CONFIG_PATH}).")
