"""The user's own price rows, imported from LiteLLM's price file by `llmtap prices import`.

They override the maintained data (llmtap.price_data) for the models they list. Rates are USD per
1M tokens, held as Decimal so a 1M-token call costs exactly the list price. Usage follows
llmtap.parsers.base: input_tokens excludes cache reads and writes, output_tokens includes reasoning
tokens, so each counter is billed once at one rate:

    cost = input*in + output*out + cache_read*read + write_5m*w5m + write_1h*w1h   (per 1M)

A long-context tier (e.g. above 200K input tokens) applies to the whole call once the prompt,
i.e. input + cache reads + cache writes, exceeds its threshold, as Anthropic and Google bill it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

MILLION = Decimal(1_000_000)
_RATE_FIELDS = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")


@dataclass(frozen=True)
class Rates:
    """USD per 1M tokens; a missing cache rate bills those tokens at the input rate."""

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write_5m: Decimal | None = None
    cache_write_1h: Decimal | None = None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], base: Rates | None = None) -> Rates:
        values = {name: _decimal(raw.get(name)) for name in _RATE_FIELDS}
        if base is not None:  # a tier only lists what changes
            values = {k: v if v is not None else getattr(base, k) for k, v in values.items()}
        if values["input"] is None or values["output"] is None:
            raise ValueError("a price needs input and output rates")
        return cls(**values)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, str]:
        return {k: _text(v) for k in _RATE_FIELDS if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class Tier:
    above_input_tokens: int
    rates: Rates


@dataclass(frozen=True)
class ModelPrice:
    name: str
    provider: str
    rates: Rates
    tiers: tuple[Tier, ...] = ()
    aliases: tuple[str, ...] = ()

    def rates_for(self, prompt_tokens: int) -> Rates:
        chosen = self.rates
        for tier in sorted(self.tiers, key=lambda t: t.above_input_tokens):
            if prompt_tokens > tier.above_input_tokens:
                chosen = tier.rates
        return chosen

    def cost(self, usage: Mapping[str, int | None]) -> Decimal:
        n = {key: int(usage.get(key) or 0) for key in _USAGE_KEYS}
        prompt = sum(n[k] for k in _USAGE_KEYS if k not in ("output_tokens",))
        r = self.rates_for(prompt)
        write_5m = r.cache_write_5m if r.cache_write_5m is not None else r.input
        write_1h = r.cache_write_1h if r.cache_write_1h is not None else write_5m
        total = (
            n["input_tokens"] * r.input
            + n["output_tokens"] * r.output
            + n["cache_read_tokens"] * (r.cache_read if r.cache_read is not None else r.input)
            + n["cache_write_5m_tokens"] * write_5m
            + n["cache_write_1h_tokens"] * write_1h
        )
        return total / MILLION


_USAGE_KEYS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
)


def _decimal(value: Any) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, float):
        value = repr(value)  # the shortest text that round-trips, not the binary expansion
    return Decimal(str(value))


def _text(value: Decimal) -> str:
    return format(value.normalize(), "f")


# -- model name resolution -------------------------------------------------------------------

_PREFIXES = re.compile(
    r"^(models/|anthropic/|openai/|google/|gemini/|vertex_ai/|"
    r"(?:[a-z]{2,4}\.)?anthropic\.)"  # Bedrock: anthropic.claude-..., us.anthropic.claude-...
)
_BEDROCK_VERSION = re.compile(r"-v\d+(:\d+)?$")
_VERTEX_DATE = re.compile(r"@(\d{8})$")
_SUFFIXES = (
    re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$"),  # dated snapshots
    re.compile(r"-latest$"),
    re.compile(r"-\d{3}$"),  # Gemini's stable versions: gemini-2.0-flash-001
)


def canonical(name: str) -> str:
    """Lower case without provider prefixes and packaging suffixes (Bedrock, Vertex)."""
    name = name.strip().lower()
    while (stripped := _PREFIXES.sub("", name)) != name:
        name = stripped
    name = _BEDROCK_VERSION.sub("", name)
    return _VERTEX_DATE.sub(r"-\1", name)


def candidates(name: str) -> list[str]:
    """Names to look up, most specific first: as given, then without date/-latest/version."""
    found = [canonical(name)]
    current = found[0]
    for suffix in _SUFFIXES:
        stripped = suffix.sub("", current)
        if stripped != current:
            current = stripped
            found.append(current)
    return found


# -- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PriceTable:
    version: str
    as_of: str
    sources: Mapping[str, str]
    models: Mapping[str, ModelPrice]
    batch_discount: Mapping[str, Decimal]

    @functools.cached_property
    def _aliases(self) -> dict[str, str]:
        table = {alias.lower(): name for name, p in self.models.items() for alias in p.aliases}
        table.update({name.lower(): name for name in self.models})
        return table

    def resolve(self, model: str | None) -> str | None:
        """The table's row name for a model, alias or dated snapshot; None when unknown."""
        if not model:
            return None
        for name in candidates(model):
            if name in self._aliases:
                return self._aliases[name]
        return None

    def price(self, model: str | None) -> ModelPrice | None:
        name = self.resolve(model)
        return self.models[name] if name else None

    def cost(self, model: str | None, usage: Mapping[str, int | None], batch: bool = False) -> Decimal | None:
        price = self.price(model)
        if price is None or not _usage_known(usage):
            return None
        total = price.cost(usage)
        if batch:
            total *= self.batch_discount.get(price.provider, Decimal(1))
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "version": self.version,
            "as_of": self.as_of,
            "currency": "USD",
            "unit": "per 1M tokens",
            "sources": dict(self.sources),
            "batch_discount": {k: _text(v) for k, v in self.batch_discount.items()},
            "models": {name: _price_json(p) for name, p in self.models.items()},
        }


def _usage_known(usage: Mapping[str, int | None]) -> bool:
    return any(usage.get(key) is not None for key in _USAGE_KEYS)


def _price_json(price: ModelPrice) -> dict[str, Any]:
    row: dict[str, Any] = {"provider": price.provider, **price.rates.to_json()}
    if price.tiers:
        row["tiers"] = [
            {"above_input_tokens": t.above_input_tokens, **t.rates.to_json()} for t in price.tiers
        ]
    if price.aliases:
        row["aliases"] = list(price.aliases)
    return row


def table_from_json(raw: Mapping[str, Any]) -> PriceTable:
    models = {name: _price_from_json(name, row) for name, row in raw["models"].items()}
    return PriceTable(
        version=str(raw.get("version", "unknown")),
        as_of=str(raw.get("as_of", "unknown")),
        sources=dict(raw.get("sources") or {}),
        models=models,
        batch_discount={k: Decimal(str(v)) for k, v in (raw.get("batch_discount") or {}).items()},
    )


def _price_from_json(name: str, row: Mapping[str, Any]) -> ModelPrice:
    rates = Rates.from_json(row)
    tiers = tuple(
        Tier(int(t["above_input_tokens"]), Rates.from_json(t, base=rates)) for t in row.get("tiers") or []
    )
    aliases = tuple(str(a) for a in row.get("aliases") or [])
    return ModelPrice(name, str(row.get("provider", "unknown")), rates, tiers, aliases)


def load_table(path: Path) -> PriceTable:
    return table_from_json(json.loads(path.read_text(encoding="utf-8")))


def save_table(table: PriceTable, path: Path) -> None:
    path.write_text(json.dumps(table.to_json(), indent=2) + "\n", encoding="utf-8")


# The providers' own batch discount (Anthropic, OpenAI and Google bill batches at half price).
BATCH_DISCOUNT = {"anthropic": Decimal("0.5"), "openai": Decimal("0.5"), "google": Decimal("0.5")}


# -- LiteLLM import --------------------------------------------------------------------------

# The providers whose list prices LiteLLM copies, as (rank, our provider name); resellers
# (azure, bedrock, openrouter...) may price the same names differently and are skipped.
# The lower rank wins a name clash.
_LITELLM_PROVIDERS = {
    "anthropic": (0, "anthropic"),
    "openai": (0, "openai"),
    "gemini": (0, "google"),
    "text-completion-openai": (1, "openai"),
    "vertex_ai-language-models": (2, "google"),
    "vertex_ai-anthropic_models": (2, "anthropic"),
}
_LITELLM_MODES = {None, "chat", "completion", "responses", "embedding"}
_LITELLM_FIELDS = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cache_read",
    "cache_creation_input_token_cost": "cache_write_5m",
    "cache_creation_input_token_cost_above_1hr": "cache_write_1h",
}
_LITELLM_TIER = re.compile(r"^(?P<field>.+)_above_(?P<k>\d+)k_tokens$")


def import_litellm(path: Path) -> PriceTable:
    """A table from LiteLLM's model_prices_and_context_window.json (per-token USD floats)."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    chosen: dict[str, tuple[tuple[int, int], ModelPrice]] = {}
    for key, row in raw.items():
        price = _litellm_row(key, row)
        if price is None:
            continue
        rank = (_LITELLM_PROVIDERS[row["litellm_provider"]][0], int("/" in key))
        if price.name not in chosen or rank < chosen[price.name][0]:
            chosen[price.name] = (rank, price)
    return PriceTable(
        version=f"litellm:{Path(path).name}",
        as_of="imported",
        sources={"litellm": str(path)},
        models={name: price for name, (_, price) in sorted(chosen.items())},
        batch_discount=BATCH_DISCOUNT,
    )


def _litellm_row(key: str, row: Any) -> ModelPrice | None:
    if not isinstance(row, dict) or row.get("litellm_provider") not in _LITELLM_PROVIDERS:
        return None
    if row.get("mode") not in _LITELLM_MODES or "input_cost_per_token" not in row:
        return None
    try:
        base = Rates.from_json(_litellm_rates(row, ""), None)
        tiers = _litellm_tiers(row, base)
    except (ValueError, ArithmeticError):
        return None
    return ModelPrice(canonical(key), _LITELLM_PROVIDERS[row["litellm_provider"]][1], base, tiers)


def _litellm_rates(row: Mapping[str, Any], suffix: str) -> dict[str, Decimal]:
    rates = {}
    for field, name in _LITELLM_FIELDS.items():
        value = _decimal(row.get(field + suffix))
        if value is not None:
            rates[name] = (value * MILLION).quantize(Decimal("0.000001")).normalize()
    return rates


def _litellm_tiers(row: Mapping[str, Any], base: Rates) -> tuple[Tier, ...]:
    thresholds = sorted(
        {int(m["k"]) for key in row if (m := _LITELLM_TIER.match(key)) and m["field"] in _LITELLM_FIELDS}
    )
    tiers = []
    for k in thresholds:
        rates = _litellm_rates(row, f"_above_{k}k_tokens")
        if rates:
            tiers.append(Tier(k * 1000, Rates.from_json(rates, base=base)))
    return tuple(tiers)


# -- the override written by `llmtap prices import` -------------------------------------------

OVERRIDE_NAME = "prices.json"


def override_path(state_dir: Path) -> Path:
    """Where `llmtap prices import` puts its table; its rows win over the shipped ones."""
    return Path(state_dir) / OVERRIDE_NAME


def read_override(path: Path | None) -> PriceTable | None:
    """The override at `path`, or None when there is none.

    Raises OSError or ValueError when it exists but cannot be read.
    """
    if path is None or not path.exists():
        return None
    try:
        return load_table(path)
    except (KeyError, TypeError, AttributeError, ArithmeticError) as exc:
        raise ValueError(f"{path} is not a price table: {exc!r}") from None
