"""The pipeline: one small addon per concern, always in SPEC.md's order."""

from __future__ import annotations

from llmtap.addons.attribution import Attribution
from llmtap.addons.counting import Counting
from llmtap.addons.credentials import Credentials
from llmtap.addons.dlp import Dlp
from llmtap.addons.filters import Filters
from llmtap.addons.live import Live
from llmtap.addons.pricing import Pricing
from llmtap.addons.protocols import Protocols
from llmtap.addons.recorder import Recorder
from llmtap.addons.scope import Scope

# Every stage, in order. A stage not built yet has no addon; the order of the rest never changes.
PIPELINE = (
    "scope",
    "attribution",
    "credentials",
    "filters",
    "dlp",
    "protocols",
    "counting",  # which record is the billed call (a poll, a retrieval, an upgrade are not)
    "pricing",
    "recorder",
    "live",
)

STAGES: dict[str, type] = {
    "scope": Scope,
    "attribution": Attribution,
    "credentials": Credentials,
    "filters": Filters,
    "dlp": Dlp,
    "protocols": Protocols,
    "counting": Counting,
    "pricing": Pricing,
    "recorder": Recorder,
    "live": Live,
}


def pipeline() -> list[object]:
    """Fresh addon instances in pipeline order, each given the stages it depends on."""
    attribution = Attribution()
    credentials = Credentials(attribution=attribution)
    made: dict[str, object] = {"attribution": attribution, "credentials": credentials,
                               "dlp": Dlp(held=credentials), "recorder": Recorder(mask=credentials.mask),
                               "live": Live(mask=credentials.mask)}
    return [made.get(stage) or STAGES[stage]() for stage in PIPELINE if stage in STAGES]
