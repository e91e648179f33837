"""The daemon's config as the stages read it from their options (mitmproxy style: in configure)."""

from __future__ import annotations

from llmtap.config import Config, load_config
from llmtap.errors import LlmtapError
from mitmproxy import exceptions


def addon_config(path: str) -> Config:
    """The daemon's config as an addon sees it ("" = the defaults)."""
    try:
        return load_config(path) if path else Config()
    except LlmtapError as exc:
        raise exceptions.OptionsError(str(exc)) from None
