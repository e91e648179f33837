"""The shipped price table, name resolution, exact costs, tiers and the LiteLLM import."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from llmtap.pricing import (
    PriceTable,
    cost_usd,
    default_table,
    import_litellm,
    load_table,
    save_table,
    table_from_json,
)
from parser_helpers import run

M = 1_000_000
DATA = Path(__file__).parent.parent / "daemon" / "data" / "prices.json"


def tokens(**counts: int) -> dict[str, int]:
    return counts


def test_table_metadata() -> None:
    raw = json.loads(DATA.read_text())
    assert raw["version"] and raw["as_of"] and raw["currency"] == "USD"
    assert set(raw["sources"]) == {"anthropic", "openai", "google"}
    assert all(url.startswith("https://") for url in raw["sources"].values())
    table = default_table()
    assert table.version == raw["version"]
    for name, row in raw["models"].items():
        assert {"provider", "input", "output"} <= set(row), name
        for value in (row["input"], row["output"]):
            assert isinstance(value, str) and Decimal(value) >= 0  # strings: exact decimals


@pytest.mark.parametrize(
    ("given", "row"),
    [
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-sonnet-4-5", "claude-sonnet-4-5"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-sonnet-4-0", "claude-sonnet-4"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-opus-4-5-20251101", "claude-opus-4-5"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("claude-3-7-sonnet-20250219", "claude-3-7-sonnet"),
        ("anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # its own, older price
        ("GPT-4o-Mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("o3-2025-04-16", "o3"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-5-chat-latest", "gpt-5-chat-latest"),
        ("gpt-5-codex", "gpt-5-codex"),
        ("codex-mini-latest", "codex-mini-latest"),
        ("models/gemini-2.5-pro", "gemini-2.5-pro"),
        ("gemini-2.5-flash-preview-09-2025", "gemini-2.5-flash"),
        ("gemini-flash-lite-latest", "gemini-2.5-flash-lite"),
        ("gemini-2.0-flash-001", "gemini-2.0-flash"),
    ],
)
def test_resolution(given: str, row: str) -> None:
    assert default_table().resolve(given) == row


@pytest.mark.parametrize("unknown", ["gpt-5.9", "gpt-4o-mini-tts", "claude-9", "", None, "my-model"])
def test_unknown_models_cost_none_never_zero(unknown: str | None) -> None:
    assert default_table().resolve(unknown) is None
    assert cost_usd(unknown, tokens(input_tokens=10, output_tokens=10)) is None


# (model, usage, list price in USD) — a 1M-token call costs the published price to the cent.
LIST_PRICES = [
    ("claude-opus-4-1", tokens(input_tokens=M), "15"),
    ("claude-opus-4-1", tokens(output_tokens=M), "75"),
    ("claude-opus-4-5", tokens(output_tokens=M), "25"),
    ("claude-sonnet-4-5", tokens(input_tokens=200_000), "0.60"),
    ("claude-sonnet-4-5", tokens(output_tokens=M), "15"),
    ("claude-sonnet-4-5", tokens(cache_read_tokens=100_000, output_tokens=M), "15.03"),
    ("claude-sonnet-4-5", tokens(cache_write_5m_tokens=100_000), "0.375"),
    ("claude-sonnet-4-5", tokens(cache_write_1h_tokens=100_000), "0.60"),
    ("claude-sonnet-4", tokens(input_tokens=M), "6"),  # above 200K: the long-context rate
    ("claude-haiku-4-5", tokens(input_tokens=100_000, output_tokens=M), "5.10"),
    ("claude-3-5-haiku", tokens(output_tokens=M), "4"),
    ("claude-3-7-sonnet", tokens(input_tokens=M), "3"),  # no long-context tier
    ("gpt-4o", tokens(input_tokens=M), "2.50"),
    ("gpt-4o", tokens(cache_read_tokens=M), "1.25"),
    ("gpt-4o", tokens(output_tokens=M), "10"),
    ("gpt-4o-2024-05-13", tokens(input_tokens=M), "5"),
    ("gpt-4o-mini", tokens(input_tokens=M, output_tokens=M), "0.75"),
    ("gpt-4.1", tokens(input_tokens=M, output_tokens=M), "10"),
    ("gpt-4.1-mini", tokens(output_tokens=M), "1.60"),
    ("o3", tokens(input_tokens=M, output_tokens=M), "10"),
    ("o4-mini", tokens(output_tokens=M), "4.40"),
    ("gpt-5", tokens(input_tokens=M, cache_read_tokens=M, output_tokens=M), "11.375"),
    ("gpt-5-mini", tokens(output_tokens=M), "2"),
    ("gpt-5-nano", tokens(input_tokens=M), "0.05"),
    ("o3-pro", tokens(cache_read_tokens=M), "20"),  # no cache discount: the input rate
    ("gemini-2.5-pro", tokens(input_tokens=200_000, output_tokens=M), "10.25"),
    ("gemini-2.5-pro", tokens(input_tokens=M, output_tokens=M), "17.50"),  # long-context tier
    ("gemini-2.5-flash", tokens(input_tokens=M, output_tokens=M), "2.80"),
    ("gemini-2.5-flash-lite", tokens(input_tokens=M, output_tokens=M), "0.50"),
]


@pytest.mark.parametrize(("model", "use", "price"), LIST_PRICES)
def test_list_prices_to_the_cent(model: str, use: dict[str, int], price: str) -> None:
    exact = default_table().cost(model, use)
    assert exact == Decimal(price)
    assert cost_usd(model, use) == pytest.approx(float(price), abs=0.005)


def test_tier_threshold_counts_cached_prompt_tokens() -> None:
    table = default_table()
    at = tokens(input_tokens=100_000, cache_read_tokens=100_000)
    assert table.cost("claude-sonnet-4-5", at) == Decimal("0.33")  # 200K exactly: base rates
    over = tokens(input_tokens=100_001, cache_read_tokens=100_000)
    assert table.cost("claude-sonnet-4-5", over) == Decimal("0.66000600")  # all at 2x


def test_usage_unknown_is_none_and_zero_usage_is_zero() -> None:
    assert cost_usd("gpt-4o", {}) is None
    assert cost_usd("gpt-4o", dict.fromkeys(("input_tokens", "output_tokens"))) is None
    assert cost_usd("gpt-4o", tokens(input_tokens=0, output_tokens=0)) == 0.0


def test_batch_discount() -> None:
    use = tokens(input_tokens=M, output_tokens=M)
    assert cost_usd("claude-haiku-4-5-20251001", use) == 6.0
    assert cost_usd("claude-haiku-4-5-20251001", use, batch=True) == 3.0


def test_records_price_end_to_end() -> None:
    result = run("openai_chat_stream.sse")  # gpt-4o-2024-08-06: 210 in, 1024 cached, 56 out
    expected = Decimal(210) * Decimal("2.5") + 1024 * Decimal("1.25") + 56 * Decimal(10)
    assert default_table().cost(result["model"], result["usage"]) == expected / M
    anthropic = run("anthropic_messages_stream.sse")
    cost = default_table().cost(anthropic["model"], anthropic["usage"])
    assert cost == (
        472 * Decimal(3) + 189 * Decimal(15) + 10240 * Decimal("0.3")
        + 1536 * Decimal("3.75") + 512 * Decimal(6)
    ) / M  # fmt: skip


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    save_table(default_table(), path)
    loaded = load_table(path)
    assert loaded.models == default_table().models
    assert loaded.version == default_table().version


LITELLM = {
    "sample_spec": {"input_cost_per_token": 0, "litellm_provider": "one of..."},
    "claude-sonnet-4-5": {
        "litellm_provider": "anthropic", "mode": "chat",
        "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
        "cache_read_input_token_cost": 3e-07, "cache_creation_input_token_cost": 3.75e-06,
        "cache_creation_input_token_cost_above_1hr": 6e-06,
        "input_cost_per_token_above_200k_tokens": 6e-06,
        "output_cost_per_token_above_200k_tokens": 2.25e-05,
        "cache_read_input_token_cost_above_200k_tokens": 6e-07,
        "cache_creation_input_token_cost_above_200k_tokens": 7.5e-06,
    },
    "gpt-4o": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 2.5e-06,
               "output_cost_per_token": 1e-05, "cache_read_input_token_cost": 1.25e-06},
    "azure/gpt-4o": {"litellm_provider": "azure", "mode": "chat", "input_cost_per_token": 9e-06,
                     "output_cost_per_token": 9e-05},
    "gemini/gemini-2.5-pro": {
        "litellm_provider": "gemini", "mode": "chat",
        "input_cost_per_token": 1.25e-06, "output_cost_per_token": 1e-05,
        "input_cost_per_token_above_200k_tokens": 2.5e-06,
        "output_cost_per_token_above_200k_tokens": 1.5e-05,
    },
    "gemini-2.5-pro": {"litellm_provider": "vertex_ai-language-models", "mode": "chat",
                       "input_cost_per_token": 7e-06, "output_cost_per_token": 7e-05},
    "gpt-4o-artifact": {"litellm_provider": "openai", "mode": "chat",
                        "input_cost_per_token": 3.0000000000000004e-06,
                        "output_cost_per_token": 1.2e-05},
    "dall-e-3": {"litellm_provider": "openai", "mode": "image_generation",
                 "input_cost_per_pixel": 1e-08},
    "tts-1": {"litellm_provider": "openai", "mode": "audio_speech", "input_cost_per_character": 1.5e-05},
}  # fmt: skip


def test_import_litellm(tmp_path: Path) -> None:
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(json.dumps(LITELLM))
    table = import_litellm(path)
    assert set(table.models) == {"claude-sonnet-4-5", "gpt-4o", "gemini-2.5-pro", "gpt-4o-artifact"}
    sonnet = table.models["claude-sonnet-4-5"]
    assert sonnet.rates.input == Decimal(3) and sonnet.rates.cache_write_1h == Decimal(6)
    assert sonnet.tiers[0].above_input_tokens == 200_000
    assert sonnet.tiers[0].rates.output == Decimal("22.5")
    # The first-party Gemini API row wins over Vertex AI's and over resellers.
    assert table.models["gemini-2.5-pro"].rates.input == Decimal("1.25")
    assert table.models["gemini-2.5-pro"].provider == "google"
    assert table.models["gpt-4o"].rates.output == Decimal(10)
    assert table.models["gpt-4o-artifact"].rates.input == Decimal(3)  # float noise rounded away
    # The same costs as the shipped table, to the last digit.
    for model, use, _ in LIST_PRICES:
        if model in ("claude-sonnet-4-5", "gpt-4o", "gemini-2.5-pro"):
            assert table.cost(model, use) == default_table().cost(model, use), (model, use)
    assert table.resolve("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"


def test_import_merged_over_the_shipped_table(tmp_path: Path) -> None:
    path = tmp_path / "litellm.json"
    path.write_text(json.dumps({"gpt-4o": LITELLM["gpt-4o"] | {"output_cost_per_token": 2e-05}}))
    merged = import_litellm(path).merged_over(default_table())
    assert merged.cost("gpt-4o", tokens(output_tokens=M)) == Decimal(20)
    assert merged.resolve("claude-opus-4-1-20250805") == "claude-opus-4-1"


def test_table_from_json_rejects_rows_without_prices() -> None:
    with pytest.raises(ValueError):
        table_from_json({"models": {"x": {"provider": "openai", "input": "1"}}})
    assert isinstance(table_from_json({"models": {}}), PriceTable)
