"""The per-flow contract of the pipeline: the record each stage contributes to, the
`flow.metadata` keys the stages share, and the accessors of that per-flow state.

Stages import this module, never each other: what one stage leaves for another travels in the
flow, under a key named here. The recorder merges `fields(flow)` over the base record it builds
from the flow itself (id, times, host, status, ...) and writes the result.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any, Protocol, TypedDict

from llmtap.records.capture import mask_path
from mitmproxy import http

# -- flow.metadata keys -------------------------------------------------------------------------

RECORD_FIELDS = "llmtap.record"  # the Record fields the stages contribute (see fields())
STREAM_FLAG = "llmtap.stream"  # the response was relayed as a stream (protocols)
CAPTURE = "llmtap.capture"  # the recorder's bounded BodyCapture of a streamed response
SYSTEM_PROMPT = "llmtap.system_prompt"  # the request's system prompt text (protocols -> recorder)
WS_EXCHANGE = "llmtap.ws_exchange"  # on a flow standing for one WebSocket exchange: its upgrade's id
LIVE_PARSER = "llmtap.parser"  # a protocol parser with a live `usage` (protocols -> live)
BODIES = "llmtap.bodies"  # the flow's decoded body views (llmtap.addons.bodies.Views)
CREDENTIALS = "llmtap.credentials"  # the credentials stage's FlowState (which keys went in)
DLP_STREAM = "llmtap.dlp_stream"  # the DLP stage's StreamState of a streamed request body
BUDGETS_EARLY = "llmtap.budgets_early"  # admitted or refused at its headers (a body that may stream)
DLP_SCRUB = "llmtap.dlp_scrub"  # the sent body with alerted secrets out: kept once it has left
EXCHANGE = "llmtap.exchange"  # the protocols stage's Exchange: what it knows of the exchange in flight

# -- HTTP headers -------------------------------------------------------------------------------

# On a response a stage made itself instead of relaying it (a block): which stage. The stage's
# reason, not the status, is then the record's error.
BLOCKED_HEADER = "x-llmtap-blocked"


# -- the record ---------------------------------------------------------------------------------


class Usage(TypedDict, total=False):
    input_tokens: int | None
    output_tokens: int | None
    cache_read_tokens: int | None
    cache_write_5m_tokens: int | None
    cache_write_1h_tokens: int | None
    reasoning_tokens: int | None


class RequestSummary(TypedDict, total=False):
    """The record's `request`: what the request asked for (plus per-API extras: effort, batch)."""

    temperature: float | None
    max_tokens: int | None
    system_sha256: str | None
    tools: list[str]


class Process(TypedDict, total=False):
    """The local process that opened the connection (llmtap.proclookup)."""

    pid: int
    name: str
    exe: str
    cmdline: list[str]
    user: str
    uid: int | None  # the real uid
    tool: str | None
    script: str | None  # an interpreter's first argument, as a real path (llmtap.keybind)
    parents: list[dict[str, Any]]
    shared: bool  # its parent holds the same socket: who writes on it is not known
    foreign_root: bool  # it runs in another root filesystem (a container)


class Record(TypedDict, total=False):
    """One exchange's record: SPEC.md's fields first, then those llmtap adds."""

    # SPEC.md's record
    id: str
    started_at: str | None  # RFC 3339 UTC
    ended_at: str | None
    host: str
    method: str
    path: str  # secrets in the query masked
    status: int | None
    provider: str | None  # anthropic | openai | google | ...
    api: str | None  # messages | chat.completions | responses | generateContent | ...
    model: str | None
    stream: bool
    request: RequestSummary | None
    usage: Usage | None
    cost_usd: float | None
    stop_reason: str | None
    ttft_ms: float | None
    duration_ms: float | None
    chunks: int | None
    timeline: list[list[Any]] | None  # the chunk timeline
    process: Process | None
    credential: str | None  # the secret's name, never its value
    rules_hit: list[dict[str, Any]]
    dlp_hits: list[dict[str, Any]]
    error: str | None
    # the protocols stage (the parser's result)
    http_version: str
    first_byte_ms: float | None
    last_byte_ms: float | None
    events: int | None
    notes: list[str]
    transport: str  # "websocket" for an OpenAI Responses WebSocket exchange
    websocket: dict[str, Any]  # such an exchange: {"connection": the upgrade's id, "exchange": n}
    response_id: str
    response_model: str
    response_status: str
    service_tier: str
    speed: str  # Anthropic's "fast" mode, billed at its own rates
    web_search_requests: int
    system_fingerprint: str
    served_by: str  # OpenRouter: the provider it routed to
    provider_cost_usd: float  # what the provider said it charged
    provider_latency_ms: float
    request_id: str
    content_filter: Any
    tool_calls: Any
    batch: Any
    batch_pricing: bool
    counted_input_tokens: int
    # the counting stage: is this record the billed call?
    counted: bool
    billed_id: str
    repeat_of: str
    # the pricing stage
    price: dict[str, Any] | None  # the price's provenance (source, version, rates)
    # the budgets stage: the budgets and limits covering the call, and what was decided
    # ({"budgets": [...], "limits": [...], "decision": "admitted" | "blocked" | "rate_limited",
    #   "estimate_usd": reserved while in flight, "budget" | "limit": the one that refused it})
    policy: dict[str, Any]
    # the filters, DLP and credentials stages
    rules_missed: list[dict[str, Any]]
    dlp_skipped: str
    credential_alerts: list[dict[str, Any]]
    # a secret bound to programs (llmtap.keybind): {secret, decision: injected|refused, rule, reason}
    credential_decision: dict[str, Any]


def rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_record(flow: http.HTTPFlow) -> Record:
    """The record: what the flow itself shows, with the stages' fields merged over it."""
    request, response = flow.request, flow.response
    started = request.timestamp_start
    ended = (response.timestamp_end if response else None) or (
        flow.error.timestamp if flow.error else None
    )
    record: Record = {
        "id": flow.id,
        "started_at": rfc3339(started),
        "ended_at": rfc3339(ended),
        "host": request.pretty_host,
        "method": request.method,
        "path": mask_path(request.path),
        "status": response.status_code if response else None,
        "http_version": request.http_version,
        "provider": None,
        "api": None,
        "model": None,
        "stream": streamed(flow),
        "request": None,
        "usage": None,
        "cost_usd": None,
        "stop_reason": None,
        "ttft_ms": None,
        "duration_ms": round((ended - started) * 1000, 3) if ended else None,
        "chunks": None,
        "timeline": None,
        "process": None,
        "credential": None,
        "rules_hit": [],
        "dlp_hits": [],
        "error": flow.error.msg if flow.error else None,
    }
    record.update(flow.metadata.get(RECORD_FIELDS, {}))
    return record


def fields(flow: http.HTTPFlow) -> Record:
    """The record fields the stages contribute (model, usage, credential, rules_hit, ...).

    Each stage writes what it knows here; the recorder merges it over the base record.
    """
    contributed: Record = flow.metadata.setdefault(RECORD_FIELDS, {})
    return contributed


def contribute(flow: http.HTTPFlow, found: dict[str, Any]) -> None:
    """Merges fields a stage assembled as a plain dict (a parser's result) into the record."""
    flow.metadata.setdefault(RECORD_FIELDS, {}).update(found)


def streamed(flow: http.HTTPFlow) -> bool:
    """Whether the response was relayed as a stream."""
    return bool(flow.metadata.get(STREAM_FLAG))


class ProcessLookup(Protocol):
    """Who opened a flow's connection (the attribution stage), for the stages that need it."""

    def process_of(self, flow: http.HTTPFlow) -> Process | None:
        """What is known so far."""

    def pending(self, flow: http.HTTPFlow) -> asyncio.Future[Process | None] | None:
        """The answer still to come, or None when it is known or will never come."""
