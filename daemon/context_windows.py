"""A model's context window in tokens: from the maintained price data (genai-prices) when its row
has one, else by the model name's prefix. Shown by the terminal dashboard and the web UI."""

from __future__ import annotations

import functools

# Context windows (tokens) by model-name prefix, longest prefix first, for models whose row in the
# maintained data has none; unknown models show no %.
CONTEXT_WINDOWS: tuple[tuple[str, int], ...] = (
    ("claude-sonnet-4", 200_000), ("claude-opus-4", 200_000), ("claude-haiku-4", 200_000),
    ("claude-3", 200_000), ("claude", 200_000),
    ("gpt-4.1", 1_047_576), ("gpt-4o", 128_000), ("gpt-4-turbo", 128_000), ("gpt-5", 400_000),
    ("o4-mini", 200_000), ("o3", 200_000), ("o1", 200_000), ("codex", 400_000),
    ("gemini-2.5", 1_048_576), ("gemini-2.0", 1_048_576), ("gemini-1.5-pro", 2_097_152),
    ("gemini", 1_048_576), ("grok", 256_000), ("deepseek", 128_000), ("mistral-large", 128_000),
)


@functools.lru_cache(maxsize=1024)
def context_window(model: str | None) -> int | None:
    """The model's context window from the maintained data (genai-prices), else by its prefix."""
    from llmtap import price_data
    from llmtap.pricing import find_row

    if model and (row := find_row(price_data.bundled(), model, "")) and row[1].context_window:
        return row[1].context_window
    name = (model or "").lower().split("/")[-1]
    for prefix, size in sorted(CONTEXT_WINDOWS, key=lambda p: -len(p[0])):
        if name.startswith(prefix):
            return size
    return None
