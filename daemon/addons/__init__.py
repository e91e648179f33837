"""The pipeline: one small addon per concern, always in SPEC.md's order."""

from __future__ import annotations

from llmtap.addons.live import Live
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
    "pricing",
    "recorder",
    "live",
)

STAGES: dict[str, type] = {
    "scope": Scope,
    "protocols": Protocols,
    "recorder": Recorder,
    "live": Live,
}


def pipeline() -> list[object]:
    """Fresh addon instances in pipeline order."""
    return [STAGES[stage]() for stage in PIPELINE if stage in STAGES]
