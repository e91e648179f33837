"""The cost of one call, and where its price came from.

Sources, first that knows the model wins: the user's override (`llmtap prices import`,
llmtap.price_override), then the maintained data (genai-prices: what `llmtap prices update`
fetched, then the snapshot bundled with the package; llmtap.price_data).

The host decides whose prices apply (genai-prices matches each provider's API URL), so Claude on
Bedrock or Vertex is billed at AWS's or Google's rates and an OpenAI-compatible endpoint at its own
provider's. A host genai-prices does not know (a gateway, chatgpt.com) is priced as the record's
provider, and failing that as the provider whose models the name matches. A model no source
knows costs None, never 0.

Usage semantics differ: llmtap's input_tokens excludes cache reads and writes (as Anthropic
reports it) while genai-prices expects the whole prompt, so the counters are converted here, once.
"""

from __future__ import annotations

import datetime
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from genai_prices import Usage
from genai_prices.data_snapshot import find_provider_by_id
from genai_prices.types import ModelInfo, Provider
from llmtap import price_data
from llmtap.price_data import SOURCE, PriceData
from llmtap.price_override import PriceTable, override_path, read_override

OVERRIDE = "override"
LOOKUPS_KEPT = 2048  # (host, model) answers remembered; model names come from clients: bounded

# llmtap's provider names where genai-prices spells them differently.
_PROVIDER_IDS = {"bedrock": "aws", "xai": "x-ai"}
# Service tiers as responses report them -> genai-prices' request variants.
_TIER_CONTEXT = {"batch": {"processing": "batch"}}


@dataclass(frozen=True)
class Call:
    """What a price depends on, from the record."""

    model: str | None
    usage: Mapping[str, Any]
    host: str = ""
    path: str = ""
    provider: str | None = None
    batch: bool = False
    service_tier: str | None = None
    speed: str | None = None  # Anthropic's "fast" mode
    web_searches: int = 0  # server-side web searches, billed per 1K
    at: datetime.datetime | None = None  # prices change over time; None: now


@dataclass(frozen=True)
class Quote:
    cost: Decimal | None
    source: str | None = None  # "genai-prices" or "override"
    version: str | None = None  # of the data the row came from
    row: str | None = None  # "anthropic/claude-sonnet-4-5", or the override's row name

    @property
    def provenance(self) -> dict[str, str] | None:
        """The record's `price` object: where its cost came from (None when unpriced)."""
        if self.source is None:
            return None
        return {"source": self.source, "version": self.version or "", "row": self.row or ""}


UNPRICED = Quote(None)


_COUNTERS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_5m_tokens",
             "cache_write_1h_tokens")


def usage_known(usage: Mapping[str, Any]) -> bool:
    return usage.get("input_tokens") is not None or usage.get("output_tokens") is not None


def genai_usage(usage: Mapping[str, Any], web_searches: int = 0) -> Usage:
    """llmtap's counters as genai-prices counts them: input is the whole prompt, and cache writes
    are one counter with the 1h ones also given apart (the rest are billed at the 5m rate)."""
    n = {key: int(usage.get(key) or 0) for key in _COUNTERS}
    writes = n["cache_write_5m_tokens"] + n["cache_write_1h_tokens"]
    return Usage(
        input_tokens=n["input_tokens"] + n["cache_read_tokens"] + writes,
        output_tokens=n["output_tokens"],
        cache_read_tokens=n["cache_read_tokens"],
        cache_write_tokens=writes,
        cache_write_1h_tokens=n["cache_write_1h_tokens"],
        web_searches=web_searches,
    )


def price_context(call: Call) -> dict[str, str]:
    context = dict(_TIER_CONTEXT.get(call.service_tier or "", {}))
    if call.service_tier and not context:
        context["service_tier"] = call.service_tier
    if call.batch:
        context["processing"] = "batch"
    if call.speed:
        context["speed"] = call.speed
    return context


class Pricer:
    """Prices calls from the override and the data snapshots, most preferred first."""

    def __init__(self, data: Sequence[PriceData], override: PriceTable | None = None) -> None:
        self.data = tuple(data)
        self.override = override
        self._found: OrderedDict[tuple[int, str, str, str], tuple[Provider, ModelInfo] | None] = OrderedDict()

    def quote(self, call: Call) -> Quote:
        if not call.model or not usage_known(call.usage):
            return UNPRICED
        if self.override is not None and (row := self.override.price(call.model)) is not None:
            cost = self.override.cost(call.model, call.usage, batch=call.batch)
            return Quote(cost, OVERRIDE, self.override.version, row.name)
        for index, data in enumerate(self.data):
            found = self._find(index, data, call)
            if found is not None:
                provider, model = found
                return Quote(self._cost(provider, model, call), SOURCE, data.version,
                             f"{provider.id}/{model.id}")
        return UNPRICED

    def row(self, call: Call) -> tuple[PriceData, Provider, ModelInfo] | None:
        """The genai-prices row that would price `call` (for `llmtap prices show`)."""
        for index, data in enumerate(self.data):
            if (found := self._find(index, data, call)) is not None:
                return (data, *found)
        return None

    def _cost(self, provider: Provider, model: ModelInfo, call: Call) -> Decimal:
        at = call.at or datetime.datetime.now(datetime.UTC)
        usage = genai_usage(call.usage, call.web_searches)
        result = model.calc_price(usage, provider, genai_request_timestamp=at,
                                  price_context=price_context(call) or None)
        return result.total_price

    def _find(self, index: int, data: PriceData, call: Call) -> tuple[Provider, ModelInfo] | None:
        # The path too: some providers are told apart by it (a gateway's /groq, /together ...).
        key = (index, f"{call.host.lower()}{call.path.split('?', 1)[0]}", call.provider or "",
               str(call.model).lower())
        if key in self._found:
            self._found.move_to_end(key)
            return self._found[key]
        found = find_row(data, str(call.model), call.host, call.path, call.provider)
        self._found[key] = found
        if len(self._found) > LOOKUPS_KEPT:
            self._found.popitem(last=False)
        return found


def find_row(data: PriceData, model: str, host: str, path: str = "",
             provider_name: str | None = None) -> tuple[Provider, ModelInfo] | None:
    """The provider billing calls to `host` and its row for `model`; None when it has none."""
    model = model.removeprefix("models/")  # Gemini's resource name for a model
    providers = data.snapshot.providers
    provider = provider_for(data, host, path, provider_name, model)
    if provider is not None:
        row = provider.find_model(model, all_providers=providers)
        if row is None and "/" in model:  # a publisher prefix, e.g. Vertex's google/gemini-2.5-flash
            row = provider.find_model(model.split("/", 1)[1], all_providers=providers)
        return None if row is None else (provider, row)
    if host or provider_name:
        return None  # a known party's calls are never priced at another's rates
    for provider in providers:  # nothing to go by but the name: the first provider listing it
        if (row := provider.find_model(model, all_providers=providers)) is not None:
            return provider, row
    return None


def provider_for(data: PriceData, host: str, path: str, provider_name: str | None,
                 model: str) -> Provider | None:
    providers = data.snapshot.providers
    if host:
        url = f"https://{host.lower()}{path.split('?', 1)[0]}"
        for provider in providers:
            if re.match(provider.api_pattern, url):
                return provider
    if provider_name and (known := find_provider_by_id(
            providers, _PROVIDER_IDS.get(provider_name, provider_name))) is not None:
        return known
    for provider in providers:  # a host and provider nobody knows (a gateway): go by the name
        if provider.model_match is not None and provider.model_match.is_match(model.lower()):
            return provider
    return None


def load_pricer(state_dir: Path | None) -> tuple[Pricer, list[str]]:
    """The pricer over the price files in `state_dir` (the daemon and the CLI read them this one
    way): the override, what `prices update` stored, then the bundled data. A file that cannot be
    read is left out, and the second value says why, one line each."""
    problems: list[str] = []
    fetched: list[PriceData] = []
    override: PriceTable | None = None
    if state_dir is not None:
        path = price_data.fetched_path(state_dir)
        try:
            if (data := price_data.load_fetched(path)) is not None:
                fetched.append(data)
        except (OSError, ValueError) as exc:
            problems.append(f"updated prices {path} ignored (the bundled ones price instead): {exc}")
        path = override_path(state_dir)
        try:
            override = read_override(path)
        except (OSError, ValueError) as exc:
            hint = " (run with sudo)" if isinstance(exc, PermissionError) else ""
            problems.append(f"price override {path} ignored{hint}: {exc}")
    return Pricer([*fetched, price_data.bundled()], override), problems
