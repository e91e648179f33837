"""Requests shaped to break the budget estimate: it must stay a number, and a large one."""

from __future__ import annotations

from llmtap.price_data import bundled
from llmtap.pricing import Pricer
from llmtap.spend import estimate

ANTHROPIC = ("api.anthropic.com", "/v1/messages")


class Huge:
    provider, model, max_tokens = "anthropic", "claude-sonnet-4-5", 10**400


def test_a_max_tokens_too_large_for_a_float_is_estimated_as_too_dear_not_an_error():
    # an OverflowError here was an Addon error: the call went on, unchecked and unreserved
    cost = estimate(Pricer([bundled()]), Huge(), 10**400, *ANTHROPIC)
    assert cost > 1_000_000
