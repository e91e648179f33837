"""The bounded decoded view of held bodies (llmtap.addons.bodies): every encoding, the cap, corrupt
bodies, one decode per exchange shared by the stages, and the 413 for a body that cannot be read."""

from __future__ import annotations

import copy
import gzip
import json
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import brotli
import pytest
from fake_providers import bomb
from llmtap.addons import bodies
from llmtap.addons.bodies import MAX_DECODED, decoded_request, decoded_response
from llmtap.addons.dlp import Dlp
from llmtap.addons.filters import Filters
from llmtap.addons.protocols import Protocols
from llmtap.flow import BLOCKED_HEADER, BODIES, fields
from llmtap.parsers.encoding import zstd
from llmtap.rules import Rule, RuleStore, validate
from mitmproxy import http
from mitmproxy.test import taddons, tflow

JSON = {"content-type": "application/json"}
BODY = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64,
                   "messages": [{"role": "user", "content": "hello there " * 500}]}).encode()


def raw_deflate(data: bytes) -> bytes:
    encoder = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return encoder.compress(data) + encoder.flush()


ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "identity": lambda data: data,
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstd.compress,
    "gzip, br": lambda data: brotli.compress(gzip.compress(data)),
}


def flow_with(raw: bytes, encoding: str | None, host: str = "api.anthropic.com",
              path: str = "/v1/messages") -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request = http.Request.make("POST", f"https://{host}{path}", b"", JSON)
    if encoding:
        flow.request.headers["content-encoding"] = encoding
    flow.request.raw_content = raw  # as it came: make() would encode it, or drop the header
    return flow


def config_file(tmp_path: Path) -> str:
    path = tmp_path / "c.toml"
    path.write_text(f'state_dir = "{tmp_path}"\nrecords_dir = "{tmp_path}/r"\n')
    return str(path)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_every_encoding_is_decoded(name: str) -> None:
    flow = flow_with(ENCODERS[name](BODY), name)
    assert decoded_request(flow) == bodies.Decoded(BODY)


def test_raw_deflate_and_no_body() -> None:
    assert decoded_request(flow_with(raw_deflate(BODY), "deflate")).data == BODY
    assert decoded_request(flow_with(b"", "gzip")) == bodies.Decoded()


def test_an_identity_body_is_not_copied() -> None:
    flow = flow_with(BODY, None)
    assert decoded_request(flow).data is flow.request.raw_content


def test_the_cap_is_exact() -> None:
    assert len(decoded_request(flow_with(gzip.compress(bytes(MAX_DECODED)), "gzip")).data) == MAX_DECODED
    over = decoded_request(flow_with(gzip.compress(bytes(MAX_DECODED + 1)), "gzip"))
    assert over.data == b"" and over.error == "its gzip body decodes to more than 32 MiB"


@pytest.mark.parametrize(("raw", "encoding", "why"), [
    (b"not gzip", "gzip", "corrupt gzip body"),
    (gzip.compress(BODY)[:-20], "gzip", "truncated gzip body"),
    (b"\x00" * 10, "br", "corrupt br body"),
    (BODY, "compress", "unsupported content-encoding 'compress'"),
    (BODY, "utf-8", "unsupported content-encoding 'utf-8'"),
])
def test_a_body_that_cannot_be_decoded_says_why(raw: bytes, encoding: str, why: str) -> None:
    decoded = decoded_request(flow_with(raw, encoding))
    assert decoded.data == b"" and decoded.error is not None
    assert decoded.error.startswith("its body cannot be decoded (") and why in decoded.error


def test_a_bomb_holds_no_more_than_the_cap() -> None:
    flow = flow_with(bomb(4 * MAX_DECODED), "gzip")
    tracemalloc.start()
    try:
        decoded = decoded_request(flow)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.error is not None
    # The cap and one decoder piece, in a buffer that grows by an eighth (reserved, not written).
    assert peak < MAX_DECODED * 9 // 8 + (1 << 20), peak


def test_the_view_is_made_once_and_remade_when_the_body_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_decodes(monkeypatch)
    flow = flow_with(gzip.compress(BODY), "gzip")
    first = decoded_request(flow)
    assert decoded_request(flow) is first and calls == [1]
    flow.request.content = b'{"changed": true}'  # re-encoded as gzip
    assert decoded_request(flow).data == b'{"changed": true}' and calls == [2]
    assert copy.deepcopy(flow.metadata)[BODIES].decoded == {}  # a copy decodes its own


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = bodies.decode_all

    def counting(*args: Any) -> bytes:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(bodies, "decode_all", counting)
    return calls


def test_filters_dlp_and_protocols_share_one_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    RuleStore(tmp_path / "rules.db").add(validate(Rule("body", "text_replace", "contains", "nowhere", "x")))
    calls = count_decodes(monkeypatch)
    filters, dlp, protocols = Filters(dlp_follows=True), Dlp(), Protocols()
    with taddons.context(filters, dlp, protocols) as tctx:
        tctx.configure(filters, llmtap_state_dir=str(tmp_path), llmtap_config_file=config_file(tmp_path))
        tctx.configure(dlp, llmtap_config_file=config_file(tmp_path))
        flow = flow_with(gzip.compress(BODY.replace(b"hello", b"\\u0068ello")), "gzip")  # DLP parses
        filters.request(flow)
        dlp.request(flow)
        protocols.request(flow)
    assert calls == [1]
    assert fields(flow).get("error") is None and flow.response is None
    assert bodies.views(flow).decoded == {} and bodies.views(flow).parsed is None  # forgotten


@pytest.mark.parametrize(("provider", "host", "path"), [
    ("anthropic", "api.anthropic.com", "/v1/messages"),
    ("openai", "api.openai.com", "/v1/chat/completions"),
    ("google", "generativelanguage.googleapis.com", "/v1beta/models/gemini-2.5-pro:generateContent"),
])
def test_a_bomb_is_refused_with_a_provider_shaped_413(tmp_path: Path, provider: str, host: str,
                                                      path: str) -> None:
    filters, dlp = Filters(dlp_follows=True), Dlp()
    with taddons.context(filters, dlp) as tctx:
        tctx.configure(filters, llmtap_state_dir=str(tmp_path), llmtap_config_file=config_file(tmp_path))
        tctx.configure(dlp, llmtap_config_file=config_file(tmp_path))
        flow = flow_with(bomb(MAX_DECODED), "gzip", host, path)  # a little over
        filters.request(flow)
        dlp.request(flow)
    response = flow.response
    assert response is not None and response.status_code == 413
    assert response.headers[BLOCKED_HEADER] == "filters"
    error = json.loads(response.content or b"")["error"]
    message = ("llmtap refused this request: its gzip body decodes to more than 32 MiB; the limit is "
               "32 MiB decoded, as identity, gzip, deflate, br or zstd")
    assert error["message"] == message and fields(flow)["error"] == message
    assert {"anthropic": error.get("type"), "openai": error.get("code"),
            "google": error.get("status")}[provider] == {
        "anthropic": "request_too_large", "openai": "llmtap_body_too_large",
        "google": "INVALID_ARGUMENT"}[provider]


def test_the_dlp_stage_refuses_too_when_it_reads_first(tmp_path: Path) -> None:
    dlp = Dlp()
    with taddons.context(dlp) as tctx:
        tctx.configure(dlp, llmtap_config_file=config_file(tmp_path))
        flow = flow_with(b"\x1f\x8bjunk", "gzip")
        dlp.request(flow)
    assert flow.response is not None and flow.response.status_code == 413
    assert flow.response.headers[BLOCKED_HEADER] == "dlp"
    assert "cannot be decoded (corrupt gzip body" in fields(flow)["error"]


def test_a_streamed_or_already_answered_request_is_left_alone() -> None:
    streamed = flow_with(b"\x1f\x8bjunk", "gzip")
    streamed.request.stream = True
    assert not bodies.refuse_unreadable(streamed, "filters") and streamed.response is None
    answered = flow_with(b"\x1f\x8bjunk", "gzip")
    answered.response = http.Response.make(403)
    assert not bodies.refuse_unreadable(answered, "filters") and answered.response.status_code == 403


def test_the_protocols_stage_records_why_it_could_not_read_a_body() -> None:
    protocols = Protocols()
    flow = flow_with(b"\x1f\x8bjunk", "gzip")
    with taddons.context(protocols):
        protocols.request(flow)
        flow.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
        protocols.responseheaders(flow)
        protocols.response(flow)
    assert "request body not read: its body cannot be decoded" in fields(flow)["error"]


def test_the_response_view_is_its_own() -> None:
    flow = flow_with(gzip.compress(BODY), "gzip")
    flow.response = http.Response.make(200)
    flow.response.headers["content-encoding"] = "br"
    flow.response.raw_content = brotli.compress(b"reply")
    assert decoded_response(flow).data == b"reply" and decoded_request(flow).data == BODY


def test_a_body_of_countless_tiny_json_objects_is_refused_before_anyone_parses_it() -> None:
    from llmtap.addons.bodies import MAX_JSON_CONTAINERS, decode

    body = b"[" + b"{}," * MAX_JSON_CONTAINERS + b"{}]"  # 1.5 MB
    request = http.Request.make("POST", "https://api.anthropic.com/v1/messages", body,  # make gzips it
                                {"content-encoding": "gzip"})
    decoded = decode(request, parsed_later=True)
    assert decoded.error and "more than 500000 JSON objects and arrays" in decoded.error
    assert decode(request).error is None  # a response is only searched, never parsed whole
