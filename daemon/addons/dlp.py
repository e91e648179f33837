"""The "dlp" stage: secrets and sensitive data in request bodies (llmtap.dlp), after the rules.

A held body (the common case) is scanned once, reusing the filters stage's parse: `block` answers
the client with a 403 shaped like the provider's own errors (the SDKs raise their
PermissionDenied error) and nothing reaches the provider; `redact` rewrites the body; `alert`
only records and logs. A body streamed because it is too large to hold is redacted on the fly
(StreamRedactor, first among the stream layers, so the protocols stage sees it redacted); a
`block` finding there cannot stop what has left, so it is redacted and the exchange is cut when
the response starts.

The record gets `dlp_hits`: detector, action, location and count, never the matched value. What
is kept of the request for the record (the recorder's Markdown twin) has no secret either: a
blocked body is redacted in full, an alerted one once it has left.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmtap.addons import bodies
from llmtap.addons.bodies import load_body
from llmtap.addons.options import addon_config
from llmtap.addons.replies import refusal
from llmtap.dlp import (
    HELD_KEY,
    Finding,
    Scanner,
    StreamRedactor,
    detectors_from_config,
    held_key_action,
    redact_text,
)
from llmtap.flow import DLP_SCRUB, DLP_STREAM, fields
from llmtap.masking import NO_MASK, SecretMask
from llmtap.parsers.classify import classify
from llmtap.rules import Body, Protected
from llmtap.rules.strings import Strings
from mitmproxy import ctx, http

log = logging.getLogger(__name__)

STREAMED = "body (streamed)"


class HeldKeys(Protocol):
    """What the DLP stage needs of the credentials stage."""

    def mask(self) -> SecretMask: ...

    def key_bearing(self, flow: http.HTTPFlow) -> None: ...


def signed_body(request: http.Request) -> bool:
    """Whether the client signed the body (AWS SigV4, in its header or a presigned URL): a body
    llmtap changed (redacted, rewritten by a rule) could only fail the signature upstream."""
    auth = request.headers.get("authorization", "")
    return auth.startswith("AWS4-HMAC-SHA256 ") or "x-amz-signature=" in request.path.lower()


def summarize(findings: Iterable[Finding], where: Callable[[Finding], str]) -> list[dict[str, Any]]:
    counts = Counter((f.detector, f.action, where(f)) for f in findings)
    return [{"detector": d, "action": a, "location": loc, "count": n}
            for (d, a, loc), n in counts.items()]


def redacted(strings: Strings, findings: Iterable[Finding]) -> dict[int, str]:
    """The new value of each string with findings, all of them replaced by markers."""
    by_leaf: dict[int, list[Finding]] = {}
    for finding in findings:
        by_leaf.setdefault(finding.leaf, []).append(finding)
    return {leaf: redact_text(strings.values[leaf], found) for leaf, found in by_leaf.items()}


def record_hits(flow: http.HTTPFlow, hits: list[dict[str, Any]]) -> None:
    for hit in hits:
        if hit["action"] != "redact":
            log.warning("dlp: %s %s in %s %s", hit["action"], hit["detector"],
                        flow.request.pretty_host, hit["location"])
    contributed = fields(flow)
    contributed["dlp_hits"] = [*contributed.get("dlp_hits", []), *hits]


@dataclass
class StreamState:
    findings: list[Finding] = field(default_factory=list)

    @property
    def blocked(self) -> bool:
        return any(f.action == "block" for f in self.findings)


class Dlp:
    def __init__(self, held: HeldKeys | None = None) -> None:
        self.held = held  # the real keys llmtap holds (the credentials stage), found by value
        self.held_action = "redact"
        self.scanner = Scanner([])
        self.protected = Protected()

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("llmtap_config_file", str, "", "llmtap's TOML config file.")

    def configure(self, updated: set[str]) -> None:
        if "llmtap_config_file" in updated:
            config = addon_config(ctx.options.llmtap_config_file)
            self.scanner = Scanner(detectors_from_config(config.dlp))
            self.held_action = held_key_action(config.dlp)
            self.protected = Protected(config.rules.all_protected_fields)

    def request(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        # The body as the filters stage parsed (and maybe changed) it, if it did.
        body: Body | str | None = bodies.take_over(flow)
        if request.stream:
            self._streamed(flow)
            return
        if bodies.refuse_unreadable(flow, "dlp"):  # the filters stage has, if there is one
            return
        kept: dict[int, str] = {}
        try:
            if flow.response is None and (self.scanner or self._held()):
                body = body or self._load(flow)
                if isinstance(body, Body):
                    kept = self._scan(flow, body)
        finally:  # the rules' changes and ours, written once
            if isinstance(body, Body) and body.changed:
                if signed_body(request) and flow.response is None:
                    self._block(flow, ["a secret to redact, or a rule's change"], "its body must "
                                "change, but the client signed it (AWS SigV4) and would fail")
                else:
                    request.content = body.serialize()
                body.changed = False
        if kept and isinstance(body, Body):
            strings = body.strings(self.protected)
            for leaf, value in kept.items():
                strings.replace(leaf, value)
            flow.metadata[DLP_SCRUB] = body.serialize()

    def _scan(self, flow: http.HTTPFlow, body: Body) -> dict[int, str]:
        """Records, blocks or redacts what the detectors find; returns the strings to scrub
        (alerts) once the request has left."""
        strings = body.strings(self.protected)
        findings = self.scanner.scan(strings) + self._held_findings(flow, strings)
        if not findings:
            return {}
        record_hits(flow, summarize(findings, lambda f: f"body {strings.where(f.leaf)}"))
        blocking = sorted({f"{f.detector} at {strings.where(f.leaf)}"
                           for f in findings if f.action == "block"})
        # What is kept of the request (the recorder's Markdown twin) never has a secret: a
        # blocked body is redacted in full, and an alerted one once it has been sent.
        sent = redacted(strings, [f for f in findings if f.action == "redact"])
        alerts = any(f.action == "alert" for f in findings)
        kept = redacted(strings, findings) if blocking or alerts else {}
        if blocking:
            self._block(flow, blocking)
            sent, kept = kept, {}
        for leaf, value in sent.items():
            strings.replace(leaf, value)
        body.changed = body.changed or bool(sent)
        return kept

    def _held(self) -> SecretMask:
        return self.held.mask() if self.held and self.held_action != "off" else NO_MASK

    def _held_findings(self, flow: http.HTTPFlow, strings: Strings) -> list[Finding]:
        """A real key llmtap holds, in a string of the body (JSON escapes resolved): a finding
        like any detector's; and if it is let through, the response is scrubbed of its echo."""
        held = self._held()
        decoded = bodies.decoded_request(flow).data  # cached: one look at the bytes first
        if not held or (b"\\u" not in decoded and not held.in_data(decoded)):
            return []
        findings = [Finding(HELD_KEY, self.held_action, leaf, start, end)
                    for leaf, text in enumerate(strings.values) for start, end in held.found_in(text)]
        if findings and self.held_action == "alert" and self.held is not None:
            self.held.key_bearing(flow)
        return findings

    def _load(self, flow: http.HTTPFlow) -> Body | str | None:
        """The body, parsed, unless one look at its decoded bytes shows there is nothing to find.
        A JSON escape (\\u0073k-...) hides text from that look: such a body is always parsed."""
        decoded = bodies.decoded_request(flow)
        content = decoded.data
        if decoded.error is None and b"\\u" not in content and not self.scanner.may_find(content) \
                and not self._held().in_data(content):
            return None
        return load_body(flow)

    def _block(self, flow: http.HTTPFlow, what: list[str], why: str = "it contains a secret") -> None:
        request = flow.request
        provider, _ = classify(request.pretty_host, request.method, request.path)
        message = f"llmtap blocked this request: {why} ({'; '.join(what)}). Remove it and try again."
        flow.response = refusal(provider, 403, message, "llmtap_dlp_blocked", "dlp")
        fields(flow)["error"] = message

    def _streamed(self, flow: http.HTTPFlow) -> None:
        state: StreamState | None = flow.metadata.get(DLP_STREAM)
        if state is None:
            if self.scanner and flow.response is None:
                fields(flow)["dlp_skipped"] = "request body streamed before it could be scanned"
            return
        if state.findings:
            record_hits(flow, summarize(state.findings, lambda f: STREAMED))

    def _scrub(self, flow: http.HTTPFlow) -> None:
        """The request has left: what stays in memory for the later stages loses its secrets."""
        scrubbed: bytes | None = flow.metadata.pop(DLP_SCRUB, None)
        if scrubbed is not None:
            flow.request.content = scrubbed

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._scrub(flow)
        state: StreamState | None = flow.metadata.pop(DLP_STREAM, None)
        if state is not None and state.blocked:
            fields(flow)["error"] = "blocked by DLP (streamed request: redacted, exchange cut)"
            flow.kill()

    def error(self, flow: http.HTTPFlow) -> None:
        self._scrub(flow)
        flow.metadata.pop(DLP_STREAM, None)

    def request_layer(self, flow: http.HTTPFlow) -> StreamRedactor | None:
        """A streamed request body's redactor: first in line (llmtap.addons.streams), so every
        later layer sees the redacted bytes."""
        request = flow.request
        if flow.response is not None or not self.scanner:
            return None
        if request.headers.get("content-encoding", "identity").strip().lower() != "identity":
            return None  # compressed on the wire: recorded as skipped by request()
        state = StreamState()
        flow.metadata[DLP_STREAM] = state
        return StreamRedactor(self.scanner, state.findings.append)
