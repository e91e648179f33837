"""The user's override rows: LiteLLM's price file imported, saved, loaded and resolved."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from llmtap.price_override import (
    PriceTable,
    import_litellm,
    load_table,
    read_override,
    save_table,
    table_from_json,
)

M = 1_000_000


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
    assert table.cost("claude-sonnet-4-5", {"input_tokens": M, "cache_read_tokens": M}) == Decimal("6.6")
    assert table.resolve("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    source = tmp_path / "litellm.json"
    source.write_text(json.dumps(LITELLM))
    table = import_litellm(source)
    path = tmp_path / "prices.json"
    save_table(table, path)
    assert load_table(path).models == table.models
    assert read_override(path) is not None and read_override(tmp_path / "absent.json") is None
    path.write_text('{"models": {"x": {"input": "1"}}}')
    with pytest.raises(ValueError):
        read_override(path)


@pytest.mark.parametrize(("given", "row"), [
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),
    ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
    ("GPT-4o", "gpt-4o"),
    ("models/gemini-2.5-pro", "gemini-2.5-pro"),
])
def test_override_rows_resolve_snapshots_and_packaging(tmp_path: Path, given: str, row: str) -> None:
    source = tmp_path / "litellm.json"
    source.write_text(json.dumps(LITELLM))
    assert import_litellm(source).resolve(given) == row


def test_table_from_json_rejects_rows_without_prices() -> None:
    with pytest.raises(ValueError):
        table_from_json({"models": {"x": {"provider": "openai", "input": "1"}}})
    assert isinstance(table_from_json({"models": {}}), PriceTable)
