"""`llmtap prices show MODEL` and `llmtap prices import FILE`: the table behind `cost_usd`."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer
from llmtap.cli_options import ConfigOption
from llmtap.config import Config, load_config
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.pricing import (
    ModelPrice,
    PriceTable,
    Rates,
    default_table,
    effective_table,
    import_litellm,
    override_path,
    save_table,
)

with contextlib.suppress(ImportError):  # not on Windows (llmtap.inprocess)
    import pwd

prices_app = typer.Typer(no_args_is_help=True, help="The price table behind each record's cost_usd.")

_RATE_LABELS = {
    "input": "input",
    "output": "output",
    "cache_read": "cache read",
    "cache_write_5m": "cache write 5m",
    "cache_write_1h": "cache write 1h",
}


@prices_app.command("show")
def show(
    model: str = typer.Argument(..., help="A model name, alias or dated snapshot."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config: str | None = ConfigOption,
) -> None:
    """The prices llmtap bills MODEL at (USD per 1M tokens), and where they come from."""
    settings = load_config(config)
    table, override = _tables(settings)
    price = table.price(model)
    if price is None:
        raise RuntimeFailure(
            f"no price for model {model!r}: its calls are recorded with cost_usd null "
            "(add it with `llmtap prices import FILE`)"
        )
    source = "override" if override is not None and price.name in override.models else "shipped"
    origin = override if source == "override" and override is not None else default_table()
    if as_json:
        typer.echo(json.dumps(_json(model, price, source, origin, table), indent=2))
        return
    for line in _lines(model, price, source, origin, table):
        typer.echo(line)


def _tables(settings: Config) -> tuple[PriceTable, PriceTable | None]:
    path = override_path(settings.state_dir)
    try:
        return effective_table(path)
    except PermissionError:
        typer.echo(f"llmtap: cannot read {path} (run with sudo); showing the shipped table", err=True)
    except (OSError, ValueError) as exc:
        typer.echo(f"llmtap: {path} ignored ({exc}); showing the shipped table", err=True)
    return default_table(), None


def _rates_text(rates: Rates) -> str:
    return ", ".join(f"{_RATE_LABELS[k]} {v}" for k, v in rates.to_json().items())


def _lines(model: str, price: ModelPrice, source: str, origin: PriceTable, table: PriceTable) -> list[str]:
    matched = "" if price.name == model else f" (for {model!r})"
    lines = [
        f"{price.name}{matched}: {price.provider}",
        f"  USD per 1M tokens: {_rates_text(price.rates)}",
    ]
    for tier in price.tiers:
        lines.append(f"  above {tier.above_input_tokens} prompt tokens: {_rates_text(tier.rates)}")
    if price.aliases:
        lines.append(f"  aliases: {', '.join(price.aliases)}")
    discount = table.batch_discount.get(price.provider)
    if discount is not None and discount != Decimal(1):
        lines.append(f"  batch: x{discount.normalize()}")
    sources = origin.sources.get(price.provider) or ", ".join(origin.sources.values())
    lines.append(f"  table: {source} {origin.version} (as of {origin.as_of}; {sources})")
    return lines


def _json(
    model: str, price: ModelPrice, source: str, origin: PriceTable, table: PriceTable
) -> dict[str, Any]:
    return {
        "model": model,
        "row": price.name,
        "provider": price.provider,
        "usd_per_1m_tokens": price.rates.to_json(),
        "tiers": [{"above_input_tokens": t.above_input_tokens, **t.rates.to_json()} for t in price.tiers],
        "aliases": list(price.aliases),
        "batch_discount": str(table.batch_discount.get(price.provider, Decimal(1)).normalize()),
        "table": {"source": source, "version": origin.version, "as_of": origin.as_of,
                  "sources": dict(origin.sources)},
    }


@prices_app.command("import")
def import_(
    file: Path = typer.Argument(..., help="LiteLLM's model_prices_and_context_window.json."),
    config: str | None = ConfigOption,
) -> None:
    """Replace the price override with FILE's prices (LiteLLM format), for updating offline."""
    settings = load_config(config)
    table = _read_litellm(file)
    table = replace(table, as_of=datetime.date.today().isoformat())
    target = override_path(settings.state_dir)
    _write_override(table, target, settings.service_user)
    typer.echo(
        f"imported {len(table.models)} model prices from {file} into {target}; "
        f"they take precedence over the shipped table ({default_table().version}), "
        "and a running daemon uses them within seconds"
    )


def _read_litellm(file: Path) -> PriceTable:
    if not file.is_file():
        raise UsageError(f"{file} is not a file")
    try:
        table = import_litellm(file)
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"{file} is not valid JSON: {exc}") from None
    except (AttributeError, TypeError, KeyError):
        raise UsageError(f"{file} is not a LiteLLM price file (an object of model rows)") from None
    if not table.models:
        raise UsageError(
            f"{file} has no usable prices (expected LiteLLM's model_prices_and_context_window.json "
            "with anthropic, openai or gemini rows)"
        )
    return table


def _write_override(table: PriceTable, target: Path, service_user: str) -> None:
    """Atomically, readable by the service user (the proxy worker reads it)."""
    owner = _service_ids(service_user) if os.geteuid() == 0 else None
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        if not target.parent.exists():
            target.parent.mkdir(mode=0o700, parents=True)
            if owner:
                os.chown(target.parent, *owner)
        save_table(table, tmp)
        os.chmod(tmp, 0o644)
        if owner:
            os.chown(tmp, *owner)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        hint = " (run with sudo)" if isinstance(exc, PermissionError) else ""
        raise RuntimeFailure(f"cannot write {target}: {exc.strerror}{hint}") from None


def _service_ids(name: str) -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None  # not installed yet: `llmtap run` hands the state dir over when it starts
    return entry.pw_uid, entry.pw_gid
