"""The pipeline: one small addon per concern, always in SPEC.md's order."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from typing import Any

from llmtap.addons.attribution import Attribution
from llmtap.addons.budgets import Budgets
from llmtap.addons.counting import Counting
from llmtap.addons.credentials import Credentials
from llmtap.addons.dlp import Dlp
from llmtap.addons.filters import Filters
from llmtap.addons.live import Live
from llmtap.addons.pricing import Pricing
from llmtap.addons.protocols import Protocols
from llmtap.addons.recorder import Recorder
from llmtap.addons.scope import Scope
from llmtap.addons.streams import Streams
from llmtap.flow import Process
from llmtap.records.writer_process import RecordWriterProcess

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
    # Spending caps and rate limits: its request hook runs once protocols has read the request
    # (and credentials, attribution have said whose call it is), before anything goes upstream;
    # its response hook after pricing (the real cost), before the recorder (the record's policy).
    "budgets",
    "recorder",
    "live",
    # Last, once the stages above have settled whether a body streams: chains their stream
    # layers into the one callable mitmproxy calls per chunk (the order: llmtap.addons.streams).
    "streams",
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
    "budgets": Budgets,
    "recorder": Recorder,
    "live": Live,
    "streams": Streams,
}


def pipeline(lookup: socket.socket | None = None,
             writer: RecordWriterProcess | None = None,
             resolve: Callable[[dict[str, Any]], Process | None] | None = None) -> list[object]:
    """Fresh addon instances in pipeline order, each given what it depends on.

    `lookup`: the worker's end of the supervisor's process lookup (llmtap.proclookup), without
    which records carry no `process`; `writer`: the worker's record writer process, forked before
    any thread (without it the recorder writes on a thread of its own); `resolve`: the lookup
    answered in this process instead (Windows, llmtap.platform.windows.attribution).
    """
    attribution = Attribution(channel=lookup, resolve=resolve)
    credentials = Credentials(attribution=attribution)
    dlp = Dlp(held=credentials)
    protocols, pricing = Protocols(), Pricing()
    recorder = Recorder(mask=credentials.mask, lookup=attribution, process_writer=writer)
    live = Live(mask=credentials.mask, lookup=attribution)
    made: dict[str, object] = {
        "attribution": attribution,
        "credentials": credentials,
        "filters": Filters(dlp_follows=True),
        "dlp": dlp,
        "protocols": protocols,
        "pricing": pricing,
        "budgets": Budgets(pricer=lambda: pricing.pricer, request_info=protocols.request_info,
                           lookup=attribution, events=live.event),
        "recorder": recorder,
        "live": live,
        # in the order the bytes go through them
        "streams": Streams(request=(dlp, protocols),
                           response=(credentials, live, recorder, protocols)),
    }
    return [made.get(stage) or STAGES[stage]() for stage in PIPELINE if stage in STAGES]


def stage[S](stages: Iterable[object], kind: type[S]) -> S | None:
    """The pipeline's stage of that kind, if it has one (for what reports on the stages)."""
    return next((found for found in stages if isinstance(found, kind)), None)
