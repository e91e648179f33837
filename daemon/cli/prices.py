"""`llmtap prices show|update|missing|import`: the prices behind each record's `cost_usd`."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from llmtap import price_data
from llmtap.cli.history import ReadOnlyOption, SinceOption, open_index, parse_since
from llmtap.cli.options import ConfigOption
from llmtap.config import Config, load_config
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.formatting import printable
from llmtap.price_override import (
    PriceTable,
    Rates,
    import_litellm,
    override_path,
)
from llmtap.pricing import Call, Pricer, load_pricer

with contextlib.suppress(ImportError):  # not on Windows (llmtap.platform.windows.inprocess)
    import pwd

prices_app = typer.Typer(no_args_is_help=True, help="The prices behind each record's cost_usd.")

_RATE_LABELS = {
    "input": "input",
    "output": "output",
    "cache_read": "cache read",
    "cache_write_5m": "cache write 5m",
    "cache_write_1h": "cache write 1h",
}
HostOption = typer.Option("", "--host", help="Price as a call to this API host would be "
                          "(e.g. bedrock-runtime.us-east-1.amazonaws.com); default: by the name.")


def pricer(settings: Config) -> Pricer:
    """The sources the daemon prices with, as this user can read them (problems on stderr)."""
    prices, problems = load_pricer(settings.state_dir)
    for problem in problems:
        typer.echo(f"llmtap: {problem}", err=True)
    return prices


@prices_app.command("show")
def show(
    model: str = typer.Argument(..., help="A model name, alias or dated snapshot."),
    host: str = HostOption,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config: str | None = ConfigOption,
) -> None:
    """The prices llmtap bills MODEL at, and which source and row they come from."""
    prices = pricer(load_config(config))
    shown = _describe(prices, model, host)
    if shown is None:
        raise RuntimeFailure(
            f"no price for model {model!r}{' at ' + host if host else ''}: its calls are recorded "
            "with cost_usd null (`sudo llmtap prices update` fetches current prices; "
            "`llmtap prices import FILE` adds your own)"
        )
    if as_json:
        typer.echo(json.dumps(shown, indent=2))
        return
    matched = "" if shown["row"].split("/")[-1] == model else f" (for {model!r})"
    typer.echo(f"{shown['row']}{matched}")
    for line in shown["lines"]:
        typer.echo(f"  {line}")
    typer.echo(f"  source: {shown['source']} {shown['version']}")


def _describe(prices: Pricer, model: str, host: str) -> dict[str, Any] | None:
    if prices.override is not None and (row := prices.override.price(model)) is not None:
        lines = [f"USD per 1M tokens: {_rates_text(row.rates)}"]
        lines += [f"above {t.above_input_tokens} prompt tokens: {_rates_text(t.rates)}" for t in row.tiers]
        return {"model": model, "row": row.name, "source": "override", "version": prices.override.version,
                "lines": lines, "prices": row.rates.to_json()}
    found = prices.row(Call(model, {}, host=host))
    if found is None:
        return None
    data, provider, info = found
    current = info.get_prices(datetime.datetime.now(datetime.UTC))
    rates = {key: _price_text(value) for key, value in vars(current).items() if value is not None}
    lines = [f"{key}: {value}" for key, value in rates.items()]
    lines += [f"variant {variant.when}: " + ", ".join(
        f"{k} {_price_text(v)}" for k, v in vars(variant.prices).items() if v is not None)
        for variant in info.price_variants or ()]
    return {"model": model, "row": f"{provider.id}/{info.id}", "source": price_data.SOURCE,
            "version": data.version, "lines": ["USD per 1M tokens (per 1K for *_kcount):", *lines],
            "prices": rates}


def _price_text(value: Any) -> str:
    tiers = getattr(value, "tiers", None)
    if tiers is None:
        return str(value)
    above = ", ".join(f"above {t.start}: {t.price}" for t in tiers)
    return f"{value.base} ({above})"


def _rates_text(rates: Rates) -> str:
    return ", ".join(f"{_RATE_LABELS[k]} {v}" for k, v in rates.to_json().items())


@prices_app.command("update")
def update(
    url: str = typer.Option("", "--url", help="Where to fetch from (default: prices.url, upstream "
                            "genai-prices; a file: URL works offline)."),
    config: str | None = ConfigOption,
) -> None:
    """Fetch current prices (genai-prices' data) for the daemon; it uses them within seconds."""
    settings = load_config(config)
    source = url or settings.prices.url
    try:
        data = price_data.update(source, settings.state_dir, _owner(settings.service_user))
    except ValueError as exc:
        raise RuntimeFailure(f"{source} was not stored: {exc}") from None
    except OSError as exc:
        hint = " (run with sudo)" if isinstance(exc, PermissionError) else ""
        raise RuntimeFailure(f"cannot update prices: {exc}{hint}") from None
    typer.echo(f"prices updated: {data.models} models from {source} ({price_data.SOURCE} {data.version}), "
               f"stored in {price_data.fetched_path(settings.state_dir)}")


@prices_app.command("missing")
def missing(
    since: str | None = SinceOption,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    read_only: bool = ReadOnlyOption,
    config: str | None = ConfigOption,
) -> None:
    """Models of recorded calls that have no price (cost_usd null), and whether they have one now."""
    settings = load_config(config)
    rows = open_index(settings, read_only).unpriced(parse_since(since))
    prices = pricer(settings)
    for row in rows:
        call = Call(row["model"], {"input_tokens": 0}, host=row.get("host") or "",
                    provider=row.get("provider"))
        row["priced_now"] = prices.quote(call).provenance
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("every recorded call with usage has a price")
        return
    for row in rows:
        now = f"priced now by {row['priced_now']['row']}" if row["priced_now"] else "still unpriced"
        typer.echo(printable(f"{row['model']}  {row['calls']} calls  at {row.get('host') or '?'}  ({now})"))


@prices_app.command("import")
def import_(
    file: Path = typer.Argument(..., help="LiteLLM's model_prices_and_context_window.json."),
    config: str | None = ConfigOption,
) -> None:
    """Make FILE's prices (LiteLLM format) override the maintained ones, for the models it lists."""
    settings = load_config(config)
    table = _read_litellm(file)
    table = replace(table, as_of=datetime.date.today().isoformat())
    target = override_path(settings.state_dir)
    try:
        price_data.write_public(target, (json.dumps(table.to_json(), indent=2) + "\n").encode(),
                                _owner(settings.service_user))
    except OSError as exc:
        hint = " (run with sudo)" if isinstance(exc, PermissionError) else ""
        raise RuntimeFailure(f"cannot write {target}: {exc.strerror}{hint}") from None
    typer.echo(
        f"imported {len(table.models)} model prices from {file} into {target}; they take precedence "
        "over the maintained prices, and a running daemon uses them within seconds"
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


def _owner(service_user: str) -> tuple[int, int] | None:
    """Who must read the price files: the service user (the proxy worker), when running as root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(service_user)
    except KeyError:
        return None  # not installed yet: `llmtap run` hands the state dir over when it starts
    return entry.pw_uid, entry.pw_gid


def register(root: typer.Typer) -> None:
    root.add_typer(prices_app, name="prices")
