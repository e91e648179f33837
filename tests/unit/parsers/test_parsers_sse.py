"""Framing (SSE, JSON array stream, JSON lines), content-encodings, routing and the common
parser contract (never raises, timing, header capture)."""

from __future__ import annotations

import gzip
import json
import zlib

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llmtap.parsers import RequestInfo, classify, parse_request, response_parser
from llmtap.parsers.encoding import BodyDecoder, DecodeError, decode_all, zstd
from llmtap.parsers.sse import (
    Event,
    FramingError,
    JSONLinesDecoder,
    JSONStreamDecoder,
    SSEDecoder,
)
from parser_helpers import T0, cuts_for, split
from streams import FIXTURES, load

# -- SSE ---------------------------------------------------------------------------------------


def decode(data: bytes, chunks: list[bytes] | None = None) -> list[Event]:
    decoder = SSEDecoder()
    events: list[Event] = []
    for chunk in chunks if chunks is not None else [data]:
        events += decoder.feed(chunk)
    return events


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    data = b"event: ping" + eol + b"data: {}" + eol + eol + b"data: x" + eol + eol
    assert decode(data) == [Event("ping", "{}"), Event("message", "x")]


def test_multiline_data_comments_id_retry_and_fields() -> None:
    data = (
        b": this is a comment\n"
        b"id: 7\nretry: 1500\nevent: update\n"
        b"data: line one\ndata:line two\ndata\n"
        b"unknown: ignored\n\n"
        b"data: after\n\n"
    )
    decoder = SSEDecoder()
    events = decoder.feed(data)
    assert events == [
        Event("update", "line one\nline two\n", "7", 1500),
        Event("message", "after", "7", 1500),
    ]
    assert decoder.comments == 1


def test_an_event_without_data_is_not_dispatched() -> None:
    assert decode(b"event: nothing\n\n: keepalive\n\ndata: yes\n\n") == [Event("message", "yes")]


def test_bom_is_dropped_even_when_split() -> None:
    data = b"\xef\xbb\xbfdata: a\n\n"
    assert decode(data, [data[:1], data[1:2], data[2:]]) == [Event("message", "a")]


def test_split_inside_multibyte_char_and_between_cr_and_lf() -> None:
    data = "data: météo 🌦️\r\n\r\ndata: 二\r\n\r\n".encode()
    expected = decode(data)
    assert expected == [Event("message", "météo 🌦️"), Event("message", "二")]
    for cut in range(1, len(data)):
        assert decode(data, [data[:cut], data[cut:]]) == expected, cut


def test_a_cr_at_a_chunk_end_is_not_a_blank_line_with_the_next_lf() -> None:
    assert decode(b"", [b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]) == [Event("message", "a\nb")]


def test_pending_and_oversized_event() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    decoder.feed(b"data: partial")
    assert decoder.pending
    with pytest.raises(FramingError):
        decoder.feed(b"x" * 100)


_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20
)


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.sampled_from(["", "delta", "ping"]), st.lists(_text, min_size=1, max_size=3)),
        max_size=6,
    ),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    data=st.data(),
)
def test_any_stream_in_any_chunks(events: list[tuple[str, list[str]]], eol: str, data: st.DataObject) -> None:
    text = ""
    for name, lines in events:
        text += f"event: {name}{eol}" if name else ""
        text += "".join(f"data: {line}{eol}" for line in lines) + eol
    raw = text.encode()
    cuts = data.draw(cuts_for(raw))
    expected = [Event(name or "message", "\n".join(lines)) for name, lines in events]
    assert decode(raw, split(raw, cuts)) == expected


# -- JSON array stream and JSON lines -----------------------------------------------------------


def array(data: bytes, chunks: list[bytes] | None = None) -> tuple[list[object], bool]:
    decoder = JSONStreamDecoder()
    values: list[object] = []
    for chunk in chunks if chunks is not None else [data]:
        values += decoder.feed(chunk)
    return values, decoder.complete


def test_array_stream_elements_as_they_close() -> None:
    decoder = JSONStreamDecoder()
    assert decoder.feed(b'[{"a": "}{\\"]", "n": [1, {"b": 2}]}') == [{"a": '}{"]', "n": [1, {"b": 2}]}]
    assert decoder.feed(b'\n,\r\n{"c"') == []
    assert decoder.feed(b": 3}\n]") == [{"c": 3}]
    assert decoder.complete and not decoder.pending


def test_array_stream_single_object_and_empty() -> None:
    assert array(b'  {"error": {"code": 429}}\n') == ([{"error": {"code": 429}}], True)
    assert array(b"[]") == ([], True)
    assert array(b"") == ([], False)


@pytest.mark.parametrize("bad", [b"[1, 2]", b"nope", b'[{"a":1}] x', b'[{"a":1} {"b":2}'])
def test_array_stream_garbage(bad: bytes) -> None:
    with pytest.raises((FramingError, ValueError)):
        array(bad)


def test_array_stream_truncated_is_pending() -> None:
    decoder = JSONStreamDecoder()
    decoder.feed(b'[{"a": 1},\n{"b": ')
    assert decoder.pending and not decoder.complete


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_array_stream_any_chunks(data: st.DataObject) -> None:
    raw = load("gemini_stream.json")
    expected = json.loads(raw)
    cuts = data.draw(cuts_for(raw))
    assert array(raw, split(raw, cuts)) == (expected, True)


def test_json_lines() -> None:
    decoder = JSONLinesDecoder()
    assert decoder.feed(b'{"a": 1}\n\n{"b"') == [{"a": 1}]
    assert decoder.feed(b": 2}") == []
    assert decoder.close() == [{"b": 2}]


# -- content-encoding ---------------------------------------------------------------------------

PAYLOAD = ("data: " + json.dumps({"text": "héllo " * 500}) + "\n\n").encode() * 20


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


ENCODERS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "deflate-raw": _raw_deflate,
    "br": brotli.compress,
    "zstd": zstd.compress,
}


def decode_chunks(encoding: str, chunks: list[bytes], cap: int = 1 << 26) -> bytes:
    decoder = BodyDecoder(encoding, cap)
    out = b"".join(piece for chunk in chunks for piece in decoder.decode(chunk))
    return out + b"".join(decoder.finish())


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encodings_round_trip_in_small_chunks(name: str) -> None:
    encoded = ENCODERS[name](PAYLOAD)
    header = name.split("-")[0]
    chunks = [encoded[i : i + 7] for i in range(0, len(encoded), 7)]
    assert decode_chunks(header, chunks) == PAYLOAD


def test_multi_member_gzip_and_chained_encodings() -> None:
    assert decode_all(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", 100) == b"abcd"
    assert decode_all(brotli.compress(gzip.compress(b"xyz")), "gzip, br", 100) == b"xyz"
    assert decode_all(b"plain", "identity", 100) == b"plain"


def test_zstd_frames_back_to_back_with_a_skippable_frame() -> None:
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"xyz"
    body = zstd.compress(b"ab") + skippable + zstd.compress(b"cd")
    assert decode_chunks("zstd", [body[i : i + 3] for i in range(0, len(body), 3)]) == b"abcd"
    with pytest.raises(DecodeError, match="truncated"):
        decode_chunks("zstd", [body[:-2]])  # cut inside the second frame


@pytest.mark.parametrize("name", list(ENCODERS))
def test_decompression_bomb_is_capped(name: str) -> None:
    bomb = ENCODERS[name](b"\0" * (64 * 1024 * 1024))
    decoder = BodyDecoder(name.split("-")[0], 1024 * 1024)
    with pytest.raises(DecodeError, match="over"):
        for i in range(0, len(bomb), 4096):
            for _ in decoder.decode(bomb[i : i + 4096]):  # lazily made: take each piece
                pass
    assert decoder.budget.used < 2 * 1024 * 1024  # the cap plus at most one bounded piece


@pytest.mark.parametrize("name", ["gzip", "deflate", "br", "zstd"])
def test_truncated_compressed_body(name: str) -> None:
    encoded = ENCODERS[name](PAYLOAD)
    with pytest.raises(DecodeError, match="truncated"):
        decode_chunks(name, [encoded[: len(encoded) // 2]])


@pytest.mark.parametrize("name", list(ENCODERS))
def test_wrong_encoding_is_an_error(name: str) -> None:
    with pytest.raises(DecodeError):
        decode_chunks(name.split("-")[0], [b"\x89not compressed at all, just text" * 3])


def test_unsupported_encoding() -> None:
    with pytest.raises(DecodeError, match="unsupported"):
        BodyDecoder("compress", 100)


# -- routing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "method", "path", "expected"),
    [
        ("api.anthropic.com", "POST", "/v1/messages", ("anthropic", "messages")),
        ("api.anthropic.com:443", "POST", "/v1/messages?beta=true", ("anthropic", "messages")),
        ("API.Anthropic.com", "POST", "/v1/messages/count_tokens", ("anthropic", "messages.count_tokens")),
        ("api.anthropic.com", "POST", "/v1/messages/batches", ("anthropic", "messages.batches")),
        ("api.anthropic.com", "GET", "/v1/messages/batches/msgbatch_1", ("anthropic", "messages.batches")),
        ("api.anthropic.com", "GET", "/v1/messages/batches/msgbatch_1/results",
         ("anthropic", "messages.batches.results")),
        ("api.anthropic.com", "POST", "/v1/files", ("anthropic", "unknown")),
        ("api.openai.com", "POST", "/v1/chat/completions", ("openai", "chat.completions")),
        ("api.openai.com", "POST", "/v1/responses", ("openai", "responses")),
        ("api.openai.com", "GET", "/v1/responses", ("openai", "responses")),
        ("api.openai.com", "GET", "/v1/responses/resp_123", ("openai", "responses")),
        ("api.openai.com", "POST", "/v1/responses/input_tokens", ("openai", "responses.input_tokens")),
        ("api.openai.com", "POST", "/v1/embeddings", ("openai", "embeddings")),
        ("api.openai.com", "POST", "/v1/audio/speech", ("openai", "unknown")),
        ("chatgpt.com", "POST", "/backend-api/codex/responses", ("openai", "responses")),
        ("generativelanguage.googleapis.com", "POST",
         "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
         ("google", "streamGenerateContent")),
        ("generativelanguage.googleapis.com", "POST", "/v1/models/gemini-2.5-flash:generateContent",
         ("google", "generateContent")),
        ("generativelanguage.googleapis.com", "POST", "/v1beta/models/gemini-2.5-pro:countTokens",
         ("google", "countTokens")),
        ("us-central1-aiplatform.googleapis.com", "POST",
         "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent",
         ("google", "generateContent")),
        ("generativelanguage.googleapis.com", "GET", "/v1beta/files", ("google", "unknown")),
        ("gateway.example.com", "POST", "/anthropic/v1/messages", ("anthropic", "messages")),
        ("gateway.example.com", "POST", "/openai/v1/chat/completions", ("openai", "chat.completions")),
        ("gateway.example.com", "GET", "/v1/models", ("unknown", "unknown")),
    ],
)  # fmt: skip
def test_classify(host: str, method: str, path: str, expected: tuple[str, str]) -> None:
    assert classify(host, method, path) == expected


# -- the common parser contract -----------------------------------------------------------------


def test_unknown_api_is_timed_not_parsed() -> None:
    info = parse_request("api.openai.com", "POST", "/v1/audio/speech", b"\x00\x01binary")
    assert (info.provider, info.api, info.error) == ("openai", "unknown", None)
    parser = response_parser(info, started=T0, headers={"content-type": "audio/mpeg"})
    parser.feed(b"\xff\xfb" * 100, T0 + 0.1)
    parser.feed(b"", T0 + 0.2)
    result = parser.result()
    assert result["api"] == "unknown" and result["error"] is None
    assert result["chunks"] == 1 and result["timeline"] == [[100.0, 200]]


def test_timeline_and_ttft_follow_the_clock() -> None:
    info = parse_request(*_route("openai_chat_stream.sse"), b"")
    parser = response_parser(info, started=T0, headers={"content-type": "text/event-stream"})
    raw = load("openai_chat_stream.sse")
    first_event_end = raw.index(b"\n\n") + 2
    parser.feed(raw[:first_event_end], T0 + 0.1)  # role only: not content yet
    parser.feed(raw[first_event_end:], T0 + 0.3)
    parser.feed(b"", T0 + 0.4)
    result = parser.result()
    assert result["first_byte_ms"] == 100.0
    assert result["ttft_ms"] == 300.0
    assert result["timeline"] == [[100.0, first_event_end], [300.0, len(raw) - first_event_end]]
    assert result["last_byte_ms"] == 300.0


def test_only_rate_limit_and_request_id_headers_are_kept() -> None:
    headers = {
        "Content-Type": "application/json",
        "Retry-After": "7",
        "anthropic-ratelimit-requests-remaining": "0",
        "x-ratelimit-reset-tokens": "6m0s",
        "request-id": "req_011CSHoEeqs5C35K2UUqR7Fy",
        "Set-Cookie": "__cf_bm=secret",
        "authorization": "Bearer sk-ant-api03-secret",
    }
    info = RequestInfo("anthropic", "messages")
    parser = response_parser(info, started=T0, status=429, headers=headers)
    parser.feed(load("anthropic_error_529.json"), T0)
    parser.feed(b"", T0)
    result = parser.result()
    assert result["rate_limit"] == {
        "retry-after": "7",
        "anthropic-ratelimit-requests-remaining": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert result["request_id"] == "req_011CSHoEeqs5C35K2UUqR7Fy"
    assert "secret" not in json.dumps(result)


def test_error_messages_never_carry_a_key() -> None:
    body = json.dumps({"error": {"message": "Incorrect API key provided: sk-proj-abcdefgh1234.",
                                 "type": "invalid_request_error", "code": "invalid_api_key"}})  # fmt: skip
    info = parse_request("api.openai.com", "POST", "/v1/chat/completions", b"")
    parser = response_parser(info, started=T0, status=401, headers={"content-type": "application/json"})
    parser.feed(body.encode(), T0)
    parser.feed(b"", T0)
    error = parser.result()["error"]
    assert error.startswith("invalid_request_error: Incorrect API key provided")
    assert "abcdefgh" not in error


def _route(name: str) -> tuple[str, str, str]:
    fixture = FIXTURES[name]
    return fixture.host, "POST", fixture.path


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(FIXTURES)),
    junk=st.binary(max_size=200),
    encoding=st.sampled_from([None, "gzip", "br", "zstd", "deflate", "bogus"]),
    status=st.sampled_from([200, 400, 500]),
    data=st.data(),
)
def test_feed_never_raises(
    name: str, junk: bytes, encoding: str | None, status: int, data: st.DataObject
) -> None:
    fixture = FIXTURES[name]
    raw = fixture.body
    cut = data.draw(st.integers(min_value=0, max_value=len(raw)))
    stream = raw[:cut] + junk
    headers = {"content-type": fixture.content_type}
    if encoding:
        headers["content-encoding"] = encoding
    info = parse_request(*_route(name), junk)
    parser = response_parser(info, started=T0, status=status, headers=headers)
    for chunk in split(stream, data.draw(cuts_for(stream, 8))):
        parser.feed(chunk, T0 + 1)
    parser.feed(b"", T0 + 2)
    result = parser.result()
    assert set(result) >= {"usage", "error", "chunks", "timeline", "ttft_ms", "stop_reason"}
