"""Prices from genai-prices: token semantics, tiers, variants, hosts, sources and provenance."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from llmtap import price_data
from llmtap.price_override import import_litellm
from llmtap.pricing import LOOKUPS_KEPT, Call, Pricer, genai_usage
from parser_helpers import run

M = 1_000_000
ANTHROPIC = "api.anthropic.com"
OPENAI = "api.openai.com"
GEMINI = "generativelanguage.googleapis.com"


def cost(model: str, host: str = "", path: str = "", provider: str | None = None,
         **kwargs: Any) -> Decimal | None:
    usage = {k: v for k, v in kwargs.items() if k.endswith("_tokens")}
    rest = {k: v for k, v in kwargs.items() if not k.endswith("_tokens")}
    return Pricer([price_data.bundled()]).quote(
        Call(model, usage, host=host, path=path, provider=provider, **rest)).cost


# (model, host, usage, the provider's list price in USD) — to the last digit.
LIST_PRICES = [
    ("claude-sonnet-4-5", ANTHROPIC, {"input_tokens": 100_000}, "0.3"),
    ("claude-sonnet-4-5-20250929", ANTHROPIC, {"output_tokens": M}, "15"),
    # Anthropic's input_tokens excludes cache reads and writes: each is billed at its own rate.
    ("claude-sonnet-4-5", ANTHROPIC, {"input_tokens": 1000, "cache_read_tokens": 100_000}, "0.033"),
    ("claude-sonnet-4-5", ANTHROPIC, {"input_tokens": 0, "cache_write_5m_tokens": 100_000}, "0.375"),
    ("claude-sonnet-4-5", ANTHROPIC, {"input_tokens": 0, "cache_write_1h_tokens": 100_000}, "0.6"),
    # Above 200K prompt tokens (input + cache) the whole call is at the long-context rates.
    ("claude-sonnet-4-5", ANTHROPIC, {"input_tokens": 150_000, "cache_read_tokens": 100_000,
                                      "output_tokens": 1000}, "0.9825"),
    ("claude-opus-4-1", ANTHROPIC, {"input_tokens": M, "output_tokens": M}, "90"),
    ("claude-haiku-4-5-20251001", ANTHROPIC, {"input_tokens": 100_000, "output_tokens": M}, "5.1"),
    ("gpt-4o-2024-08-06", OPENAI, {"input_tokens": M, "cache_read_tokens": M, "output_tokens": M}, "13.75"),
    ("gpt-5", OPENAI, {"input_tokens": M, "cache_read_tokens": M, "output_tokens": M}, "11.375"),
    ("o3-pro", OPENAI, {"cache_read_tokens": M, "input_tokens": 0}, "20"),  # no cache rate: input's
    ("gemini-2.5-pro", GEMINI, {"input_tokens": 200_000, "output_tokens": M}, "10.25"),
    ("gemini-2.5-pro", GEMINI, {"input_tokens": M, "output_tokens": M}, "17.5"),  # long context
    ("models/gemini-2.5-flash", GEMINI, {"input_tokens": M, "output_tokens": M}, "2.8"),
]


@pytest.mark.parametrize(("model", "host", "usage", "price"), LIST_PRICES)
def test_list_prices_to_the_last_digit(model: str, host: str, usage: dict[str, int], price: str) -> None:
    assert cost(model, host, **usage) == Decimal(price)


def test_usage_conversion_gives_genai_prices_the_whole_prompt() -> None:
    usage = genai_usage({"input_tokens": 10, "cache_read_tokens": 100, "cache_write_5m_tokens": 20,
                         "cache_write_1h_tokens": 30, "output_tokens": 7, "reasoning_tokens": 5})
    assert (usage.input_tokens, usage.cache_read_tokens, usage.cache_write_tokens,
            usage.cache_write_1h_tokens, usage.output_tokens) == (160, 100, 50, 30, 7)


def test_a_claude_code_turn_costs_what_claude_code_reports() -> None:
    """Claude Code 2.1.332's own `total_cost_usd` for this usage of its default model was 0.041276
    (its modelUsage.costUSD, measured against a fake upstream; see test_claude_code_e2e)."""
    usage = {"input_tokens": 1234, "output_tokens": 567, "cache_read_tokens": 20000,
             "cache_write_5m_tokens": 1000, "cache_write_1h_tokens": 2000}
    assert cost("claude-opus-5-5", ANTHROPIC, **usage) == Decimal("0.041276")


@pytest.mark.parametrize(("model", "host"), [
    ("claude-opus-5-5", ANTHROPIC),  # Claude Code 2.1.332's default
    ("gemini-3.1-pro-preview", GEMINI),  # Gemini CLI 0.61's default
    ("gemini-3.5-flash-lite", GEMINI),  # ... and its router's
])
def test_the_cli_default_models_are_priced_out_of_the_box(model: str, host: str) -> None:
    assert cost(model, host, input_tokens=1000, output_tokens=100)


def test_variants_batch_service_tier_fast_mode_and_web_searches() -> None:
    use = {"input_tokens": M, "output_tokens": M}
    assert cost("claude-haiku-4-5", ANTHROPIC, batch=True, **use) == Decimal(3)
    assert cost("claude-haiku-4-5", ANTHROPIC, service_tier="batch", **use) == Decimal(3)
    assert cost("claude-opus-4-8", ANTHROPIC, speed="fast", **use) == Decimal(60)
    assert cost("claude-opus-4-8", ANTHROPIC, speed="standard", **use) == Decimal(30)
    assert cost("gpt-4o", OPENAI, service_tier="priority", **use) == Decimal("21.25")
    assert cost("gpt-4o", OPENAI, service_tier="default", **use) == Decimal("12.5")
    assert cost("claude-opus-5-5", ANTHROPIC, web_searches=3, **use) == Decimal("24.03")


@pytest.mark.parametrize(("host", "path", "model", "row"), [
    ("bedrock-runtime.us-east-1.amazonaws.com", "/model/x/invoke",
     "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "aws/"),
    ("us-east5-aiplatform.googleapis.com", "/v1/projects/p/locations/us-east5/publishers/anthropic/"
     "models/claude-sonnet-4-5@20250929:rawPredict", "claude-sonnet-4-5@20250929",
     "google/claude-sonnet-4-5"),
    ("myres.openai.azure.com", "/openai/deployments/d/chat/completions", "gpt-4o-2024-11-20", "azure/gpt-4o"),
    (GEMINI, "/v1beta/openai/chat/completions", "gemini-2.5-flash", "google/gemini-2.5-flash"),
    ("us-central1-aiplatform.googleapis.com", "/v1/projects/p/locations/us-central1/endpoints/openapi/"
     "chat/completions", "google/gemini-2.5-flash", "google/gemini-2.5-flash"),
    (ANTHROPIC, "/v1/chat/completions", "claude-sonnet-4-5", "anthropic/claude-sonnet-4-5"),
    ("api.groq.com", "/openai/v1/chat/completions", "llama-3.3-70b-versatile", "groq/"),
    ("openrouter.ai", "/api/v1/chat/completions", "anthropic/claude-sonnet-4.5", "openrouter/"),
    ("api.deepseek.com", "/chat/completions", "deepseek-chat", "deepseek/"),
])
def test_the_host_decides_whose_prices_apply(host: str, path: str, model: str, row: str) -> None:
    quote = Pricer([price_data.bundled()]).quote(Call(model, {"input_tokens": 10}, host=host, path=path))
    assert quote.cost is not None and quote.row is not None and quote.row.startswith(row)
    assert quote.provenance == {"source": "genai-prices", "version": price_data.bundled().version,
                                "row": quote.row}


def test_an_unknown_host_is_priced_as_the_records_provider_or_by_the_name() -> None:
    codex = Call("gpt-5", {"input_tokens": M}, host="chatgpt.com", provider="openai")
    assert Pricer([price_data.bundled()]).quote(codex).row == "openai/gpt-5"
    gateway = Call("claude-sonnet-4-5", {"output_tokens": M}, host="llm.corp.example")
    assert Pricer([price_data.bundled()]).quote(gateway).cost == Decimal(15)


@pytest.mark.parametrize("model", ["gpt-9.9-imaginary", "claude-9", "", None, "my-model"])
def test_unknown_models_cost_none_never_zero(model: str | None) -> None:
    quote = Pricer([price_data.bundled()]).quote(Call(model, {"input_tokens": 10}, host=ANTHROPIC))
    assert quote.cost is None and quote.provenance is None


def test_a_model_unknown_at_its_host_is_not_priced_at_another_providers_rates() -> None:
    assert cost("claude-sonnet-4-5", OPENAI, input_tokens=10) is None


def test_no_usage_is_none_and_zero_usage_is_zero() -> None:
    assert cost("claude-sonnet-4-5", ANTHROPIC) is None
    assert cost("claude-sonnet-4-5", ANTHROPIC, input_tokens=0, output_tokens=0) == 0


def test_fixtures_price_end_to_end() -> None:
    chat = run("openai_chat_stream.sse")  # gpt-4o-2024-08-06: 210 in, 1024 cached, 56 out
    expected = (Decimal(210) * Decimal("2.5") + 1024 * Decimal("1.25") + 56 * Decimal(10)) / M
    assert cost(chat["model"], OPENAI, **chat["usage"]) == expected
    messages = run("anthropic_messages_stream.sse")
    assert cost(messages["model"], ANTHROPIC, **messages["usage"]) == (
        472 * Decimal(3) + 189 * Decimal(15) + 10240 * Decimal("0.3")
        + 1536 * Decimal("3.75") + 512 * Decimal(6)
    ) / M  # fmt: skip


def test_the_override_wins_for_the_models_it_lists(tmp_path: Path) -> None:
    litellm = tmp_path / "litellm.json"
    litellm.write_text(json.dumps({
        "gpt-4o": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-06,
                   "output_cost_per_token": 2e-05}}))
    override = import_litellm(litellm)
    pricer = Pricer([price_data.bundled()], override)
    quote = pricer.quote(Call("gpt-4o-2024-08-06", {"output_tokens": M}, host=OPENAI))
    assert (quote.cost, quote.source, quote.row) == (Decimal(20), "override", "gpt-4o")
    assert pricer.quote(Call("gpt-5", {"output_tokens": M}, host=OPENAI)).source == "genai-prices"


def fetched_data(providers: list[dict[str, Any]]) -> bytes:
    return json.dumps(providers).encode()


MYSTERY_PROVIDER = {
    "id": "openai", "name": "OpenAI", "api_pattern": "https://api\\.openai\\.com",
    "models": [{"id": "gpt-mystery", "match": {"equals": "gpt-mystery"},
                "prices": {"input_mtok": 7, "output_mtok": 9}}],
}


def test_fetched_data_is_preferred_and_the_bundled_fills_in(tmp_path: Path) -> None:
    data = price_data.parse(fetched_data([MYSTERY_PROVIDER]), "file:test", "2026-12-02T00:00:00Z")
    assert data.version.startswith("fetched 2026-12-02T00:00:00Z sha256:") and data.models == 1
    pricer = Pricer([data, price_data.bundled()])
    mystery = pricer.quote(Call("gpt-mystery", {"input_tokens": M}, host=OPENAI))
    assert (mystery.cost, mystery.version) == (Decimal(7), data.version)
    assert pricer.quote(Call("gpt-5", {"input_tokens": M}, host=OPENAI)).version == \
        price_data.bundled().version


@pytest.mark.parametrize("raw", [b"", b"{", b"{}", b"[]", b'[{"id": "x"}]', b"\xff\xfe"])
def test_data_that_is_not_genai_prices_is_refused_in_one_line(raw: bytes) -> None:
    with pytest.raises(ValueError) as caught:
        price_data.parse(raw, "file:x", "now")
    assert "\n" not in str(caught.value) and str(caught.value).startswith("not genai-prices data")


def test_update_stores_the_data_and_keeps_the_old_when_the_new_is_bad(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_bytes(fetched_data([MYSTERY_PROVIDER]))
    bad.write_text("<html>rate limited</html>")
    state = tmp_path / "state"
    price_data.update(good.as_uri(), state)
    stored = price_data.fetched_path(state)
    assert stored.stat().st_mode & 0o777 == 0o644
    with pytest.raises(ValueError):
        price_data.update(bad.as_uri(), state)
    loaded = price_data.load_fetched(stored)
    assert loaded is not None and loaded.origin == good.as_uri() and loaded.models == 1
    with pytest.raises(OSError, match="only https:// and file:"):
        price_data.update("http://example.invalid/data.json", state)


def test_lookups_stay_bounded_whatever_model_names_clients_send() -> None:
    pricer = Pricer([price_data.bundled()])
    for n in range(LOOKUPS_KEPT + 500):
        pricer.quote(Call(f"claude-sonnet-4-5-{n}", {"input_tokens": 1}, host=ANTHROPIC))
    assert len(pricer._found) == LOOKUPS_KEPT


def test_the_configured_default_url_is_genai_prices_own() -> None:
    from llmtap.config import PricesConfig

    assert PricesConfig().url == price_data.UPDATE_URL


def test_one_host_with_providers_told_apart_by_the_path_is_priced_per_path() -> None:
    pricer, model = Pricer([price_data.bundled()]), "meta-llama/llama-3.3-70b-instruct"
    rows = [pricer.quote(Call(model, {"input_tokens": 1000}, host="router.huggingface.co", path=path)).row
            for path in ("/groq/openai/v1/chat/completions", "/together/v1/chat/completions")]
    assert [row.split("/")[0] for row in rows if row] == ["huggingface_groq", "huggingface_together"]


def test_the_daemon_and_the_cli_read_the_price_files_one_way(tmp_path: Path) -> None:
    from llmtap.pricing import load_pricer

    (tmp_path / "prices.json").write_text("{broken")
    price_data.fetched_path(tmp_path).write_text("[]")
    pricer, problems = load_pricer(tmp_path)
    assert pricer.override is None and pricer.data == (price_data.bundled(),)
    assert [p.split(" ", 2)[:2] for p in problems] == [["updated", "prices"], ["price", "override"]]
    assert all("\n" not in p for p in problems)
    assert load_pricer(None)[1] == []
