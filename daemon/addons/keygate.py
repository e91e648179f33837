"""The credentials stage's side of keys bound to programs (llmtap.keybind): who made a request,
the 403 for a program the key is not for, and the decision as the record keeps it."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from llmtap.addons.replies import refusal
from llmtap.flow import Process, ProcessLookup, fields
from llmtap.held_keys import Entry
from llmtap.parsers.classify import host_provider, normalise_host
from mitmproxy import http

log = logging.getLogger("llmtap.addons.credentials")  # its lines read as the stage's

WAIT_S = 2.0  # how long a user or program check waits to learn who made a request
REFUSED_CODE = "llmtap_key_not_allowed"


class Who:
    """Attribution's answer for a flow, waited for a little (it is asked when the connection
    is accepted, so it has almost always come before the request headers)."""

    def __init__(self, attribution: ProcessLookup | None) -> None:
        self.attribution = attribution

    async def process(self, flow: http.HTTPFlow) -> Process | None:
        """The process that opened the flow's connection; None when it is not known in time."""
        if self.attribution is None:
            return None
        process = self.attribution.process_of(flow)
        pending = self.attribution.pending(flow) if process is None else None
        if pending is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                process = await asyncio.wait_for(asyncio.shield(pending), WAIT_S)
        return process if isinstance(process, dict) else None


def refuse(flow: http.HTTPFlow, entry: Entry, why: str) -> None:
    """A provider-shaped 403 instead of the upstream: the agent shows it, the upstream sees nothing."""
    message = (f"llmtap refused the key of secret {entry.name!r}: it is only added for "
               f"{entry.binding.rule()}, and {why}")
    flow.request.stream = False  # a response and a streamed request cannot go together
    provider = host_provider(normalise_host(flow.request.pretty_host))
    flow.response = refusal(provider, 403, message, REFUSED_CODE, "credentials")
    record = fields(flow)
    record["credential"] = entry.name
    record["error"] = message
    decided(flow, entry, "refused", why)
    log.warning("%s", message.removeprefix("llmtap "))


def decided(flow: http.HTTPFlow, entry: Entry, decision: str, why: str | None = None) -> None:
    """The record's one place for a bound secret's decision."""
    fields(flow)["credential_decision"] = {
        "secret": entry.name, "decision": decision, "rule": entry.binding.rule(),
        **({"reason": why} if why else {})}
