"""Protocols, streaming and cost end to end: the official SDKs and httpx in the client namespace, no
proxy settings, one llmtap daemon, and the fake upstream serving the wire-accurate fixture streams.

Each test tags its requests with a `t=` query parameter and finds its records by it. The bytes the
upstream sends are known exactly (the fixtures, encoded deterministically by tests/support/fake_providers.py),
so "the client received byte-identical streams" is checked against them.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import fake_providers
import pytest
import streams
from testbed import Daemon, Testbed, running_daemon

pytestmark = pytest.mark.root

CLIENT = """
import base64, hashlib, json, os, threading, time
import httpx
CA = os.environ["LLMTAP_CA"]

def fetch(url, body=None, headers=None, http2=False, method="POST"):
    '''Status, the body's bytes exactly as received (still encoded), and when each piece came.'''
    times, pieces = [], []
    with httpx.Client(verify=CA, http2=http2, timeout=60) as client:
        with client.stream(method, url, content=json.dumps(body or {}),
                           headers={"content-type": "application/json", **(headers or {})}) as r:
            start = time.monotonic()
            try:
                for piece in r.iter_raw():
                    pieces.append(piece)
                    times.append(time.monotonic() - start)
            except httpx.HTTPError as exc:
                pieces.append(("error: " + type(exc).__name__).encode())
            return {"status": r.status_code, "http": r.http_version, "times": times,
                    "body": base64.b64encode(b"".join(pieces)).decode()}
"""


def client(testbed: Testbed, daemon: Daemon, code: str) -> Any:
    """Runs client code in the client namespace; it prints one JSON value as its last line."""
    script = CLIENT + textwrap.dedent(code)
    result = testbed.python(script, env={"LLMTAP_CA": str(daemon.ca_pem)})
    return json.loads(result.stdout.strip().splitlines()[-1])


def body_of(fetched: dict[str, Any]) -> bytes:
    import base64

    return base64.b64decode(fetched["body"])


def records(daemon: Daemon, tag: str, expected: int, timeout: float = 15) -> list[dict[str, Any]]:
    """The records of requests tagged `t=tag`, oldest first, once there are `expected`."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in daemon.records() if tag_of(r.get("path") or "") == tag]
        if len(found) >= expected or time.monotonic() > deadline:
            return sorted(found, key=lambda r: r["started_at"])
        time.sleep(0.1)


def tag_of(path: str) -> str | None:
    return dict(parse_qsl(urlsplit(path).query)).get("t")


def cost(**tokens_and_rates: tuple[int, str]) -> float:
    """The sum of tokens * USD per 1M, computed exactly: cost(input=(472, "3"), output=(189, "15"))."""
    total = sum(Decimal(n) * Decimal(rate) for n, rate in tokens_and_rates.values())
    return float(total / 1_000_000)


def usage(input: int, output: int, read: int = 0, w5m: int = 0, w1h: int = 0,
          reasoning: int | None = 0) -> dict[str, int | None]:
    return {"input_tokens": input, "output_tokens": output, "cache_read_tokens": read,
            "cache_write_5m_tokens": w5m, "cache_write_1h_tokens": w1h, "reasoning_tokens": reasoning}


def upstream_seen(testbed: Testbed, tag: str) -> list[dict[str, Any]]:
    return [r for r in testbed.upstream_requests() if tag_of("?" + r["query"]) == tag]


@pytest.fixture(scope="module")
def tap(testbed: Testbed) -> Iterator[Daemon]:
    """One daemon for the whole module (each test tags its own requests)."""
    with running_daemon(testbed) as daemon:
        yield daemon


SONNET_STREAM_COST = cost(input=(472, "3"), output=(189, "15"), read=(10240, "0.30"),
                          w5m=(1536, "3.75"), w1h=(512, "6"))


def test_anthropic_sdk_streamed_and_not(testbed, tap):
    out = client(testbed, tap, """
        import anthropic
        sdk = anthropic.Anthropic(api_key="sk-ant-placeholder", max_retries=0,
                                  http_client=anthropic.DefaultHttpxClient(verify=CA))
        ask = dict(max_tokens=1024, messages=[{"role": "user", "content": "Weather in Paris?"}])
        message = sdk.messages.create(model="claude-haiku-4-5", **ask, extra_query={"t": "ant-json"},
                                      extra_headers={"x-fake-fixture": "anthropic_message.json"})
        with sdk.messages.stream(model="claude-sonnet-4-5", system="Be brief.", **ask,
                                 extra_query={"t": "ant-sse"},
                                 extra_headers={"x-fake-fixture": "anthropic_messages_stream.sse",
                                                "x-fake-pause-ms": "20"}) as stream:
            final = stream.get_final_message()
        raw = fetch("https://api.anthropic.com/v1/messages?t=ant-raw", {"model": "claude-sonnet-4-5",
                    "stream": True}, {"x-fake-fixture": "anthropic_messages_stream.sse"})
        print(json.dumps({"json": message.usage.model_dump(), "stream": final.usage.model_dump(),
                          "blocks": [b.type for b in final.content], "raw": raw}))
    """)
    assert out["json"]["cache_read_input_tokens"] == 3000
    assert out["stream"]["output_tokens"] == 189 and out["blocks"] == ["thinking", "text", "tool_use"]
    assert body_of(out["raw"]) == streams.anthropic_messages_stream()  # byte for byte
    times = out["raw"]["times"]  # ~90 pieces 10 ms apart upstream: they arrive as they were sent
    assert len(times) > 20 and times[-1] - times[0] > 0.4
    [whole] = records(tap, "ant-json", 1)
    assert (whole["provider"], whole["api"], whole["model"], whole["stream"]) == (
        "anthropic", "messages", "claude-haiku-4-5-20251001", False)
    assert whole["usage"] == usage(2095, 503, read=3000, w1h=1000, reasoning=None)
    assert whole["cost_usd"] == cost(input=(2095, "1"), output=(503, "5"), read=(3000, "0.10"),
                                     w1h=(1000, "2"))
    assert whole["request"]["max_tokens"] == 1024 and whole["stop_reason"] == "tool_use"
    [streamed] = records(tap, "ant-sse", 1)
    assert streamed["stream"] is True and streamed["error"] is None
    assert streamed["usage"] == usage(472, 189, read=10240, w5m=1536, w1h=512, reasoning=None)
    assert streamed["cost_usd"] == SONNET_STREAM_COST == 0.016155
    assert streamed["request"]["system_sha256"] == hashlib.sha256(b"Be brief.").hexdigest()
    assert streamed["tool_calls"] == ["get_weather"]
    # Parsed as it passed: first content long before the end, one timeline point per chunk.
    assert 0 < streamed["ttft_ms"] < streamed["duration_ms"] - 500
    assert streamed["chunks"] == len(streamed["timeline"]) > 50


def test_a_client_that_hangs_up_after_the_last_gzip_event_gets_a_complete_record(testbed, tap):
    """litellm and aider close the connection as soon as they have the last event; with gzip the
    encoding's trailer may not have come yet. The exchange was complete: no error."""
    out = client(testbed, tap, """
        headers = {"content-type": "application/json", "accept-encoding": "gzip",
                   "x-fake-fixture": "anthropic_messages_stream.sse", "x-fake-encoding": "gzip",
                   "x-fake-pause-ms": "0", "x-fake-trailer-delay-ms": "1500"}
        seen = []
        with httpx.Client(verify=CA, timeout=30) as http:
            with http.stream("POST", "https://api.anthropic.com/v1/messages?t=hangup",
                             content=json.dumps({"model": "claude-sonnet-4-5", "stream": True}),
                             headers=headers) as reply:
                for line in reply.iter_lines():  # httpx decodes the gzip as it comes
                    seen.append(line)
                    if "message_stop" in line:
                        break  # and hang up, trailer or not
        print(json.dumps({"last": seen[-1]}))
    """)
    assert "message_stop" in out["last"]
    [record] = records(tap, "hangup", 1)
    assert record["error"] is None and record["stop_reason"] == "tool_use"
    assert record["usage"] == usage(472, 189, read=10240, w5m=1536, w1h=512, reasoning=None)
    assert any("truncated gzip body after the stream's last event" in n for n in record["notes"])


def test_openai_sdk_chat_gets_exact_usage_the_client_never_asked_for(testbed, tap):
    out = client(testbed, tap, """
        import openai
        sdk = openai.OpenAI(api_key="sk-placeholder", max_retries=0,
                            http_client=openai.DefaultHttpxClient(verify=CA))
        ask = dict(model="gpt-4o", messages=[{"role": "system", "content": "Be kind."},
                                             {"role": "user", "content": "Salut"}])
        fixture = {"x-fake-fixture": "openai_chat_stream.sse"}
        chunks = [c.model_dump() for c in sdk.chat.completions.create(
            **ask, stream=True, extra_query={"t": "oa-plain"}, extra_headers=fixture)]
        asked = [c.model_dump() for c in sdk.chat.completions.create(
            **ask, stream=True, stream_options={"include_usage": True},
            extra_query={"t": "oa-asked"}, extra_headers=fixture)]
        whole = sdk.chat.completions.create(model="gpt-4.1", messages=ask["messages"],
                                            extra_query={"t": "oa-json"},
                                            extra_headers={"x-fake-fixture": "openai_chat.json"})
        raw = fetch("https://api.openai.com/v1/chat/completions?t=oa-raw",
                    {**ask, "stream": True}, fixture)
        print(json.dumps({"chunks": chunks, "asked": asked, "whole": whole.usage.model_dump(),
                          "raw": raw}))
    """)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in out["chunks"] if c["choices"])
    assert text == "Bonjour à tous — ça va ? 👋"
    assert all(c["choices"] and c["usage"] is None for c in out["chunks"])  # no usage chunk seen
    assert out["asked"][-1]["choices"] == [] and out["asked"][-1]["usage"]["prompt_tokens"] == 1234
    assert body_of(out["raw"]) == streams.openai_chat_stream_stripped()
    sent = upstream_seen(testbed, "oa-plain")[0]
    assert json.loads(sent["body"])["stream_options"] == {"include_usage": True}
    assert sent["headers"]["accept-encoding"] == "identity"
    expected = cost(input=(210, "2.50"), output=(56, "10"), read=(1024, "1.25"))
    for tag in ("oa-plain", "oa-asked", "oa-raw"):
        [record] = records(tap, tag, 1)
        assert record["model"] == "gpt-4o-2024-08-06" and record["stream"] is True
        assert record["usage"] == usage(210, 56, read=1024) and record["cost_usd"] == expected
        assert record["error"] is None and record["stop_reason"] == "stop"
    [plain] = records(tap, "oa-plain", 1)
    assert plain["request"]["include_usage"] is False  # as the client sent it
    assert len(plain["request"]["system_sha256"]) == 64
    [whole] = records(tap, "oa-json", 1)
    assert whole["usage"] == usage(19, 10) and whole["cost_usd"] == cost(input=(19, "2"), output=(10, "8"))


def test_openai_responses_over_sse_json_and_websocket(testbed, tap):
    out = client(testbed, tap, """
        import socket, ssl
        import openai, wsproto
        from wsproto import events as ev
        sdk = openai.OpenAI(api_key="sk-placeholder", max_retries=0,
                            http_client=openai.DefaultHttpxClient(verify=CA))
        kinds = [e.type for e in sdk.responses.create(model="gpt-5", input="Weather in Paris?",
                                                      stream=True, extra_query={"t": "rs-sse"})]
        whole = sdk.responses.create(model="gpt-4.1-mini", input="Hi", extra_query={"t": "rs-json"})

        tls = ssl.create_default_context(cafile=CA).wrap_socket(
            socket.create_connection(("api.openai.com", 443)), server_hostname="api.openai.com")
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        tls.sendall(ws.send(ev.Request(host="api.openai.com", target="/v1/responses?t=rs-ws",
                                       extra_headers=[(b"authorization", b"Bearer sk-placeholder")])))
        def until(done):
            seen = []
            while True:
                ws.receive_data(tls.recv(65536))
                for event in ws.events():
                    seen.append(event)
                    if done(event):
                        return seen
        until(lambda e: isinstance(e, ev.AcceptConnection))
        create = open(os.environ["CREATE"]).read().strip()
        turns = []
        for _ in range(2):
            tls.sendall(ws.send(ev.TextMessage(create)))
            got = until(lambda e: isinstance(e, ev.TextMessage) and "response.completed" in e.data)
            turns.append([json.loads(e.data)["type"] for e in got if isinstance(e, ev.TextMessage)])
        tls.sendall(ws.send(ev.CloseConnection(code=1000)))
        print(json.dumps({"kinds": kinds, "whole": whole.usage.model_dump(), "turns": turns}))
    """.replace('os.environ["CREATE"]', repr(str(streams.DIR / "openai_responses_ws_client.json"))))
    assert out["kinds"][0] == "response.created" and out["kinds"][-1] == "response.completed"
    assert out["whole"]["output_tokens"] == 87
    assert [t[-1] for t in out["turns"]] == ["response.completed"] * 2
    gpt5 = cost(input=(425, "1.25"), output=(612, "10"), read=(1920, "0.125"))
    [sse] = records(tap, "rs-sse", 1)
    assert (sse["api"], sse["model"], sse["stream"]) == ("responses", "gpt-5-2025-08-07", True)
    assert sse["usage"] == usage(425, 612, read=1920, reasoning=448) and sse["cost_usd"] == gpt5
    [whole] = records(tap, "rs-json", 1)
    assert whole["usage"] == usage(36, 87) and whole["stream"] is False
    assert whole["cost_usd"] == cost(input=(36, "0.40"), output=(87, "1.60"))
    upgrade, *turns = records(tap, "rs-ws", 3)
    assert (upgrade["status"], upgrade["transport"], upgrade["usage"]["input_tokens"]) == (
        101, "websocket", None)
    assert len(turns) == 2
    for n, turn in enumerate(turns, start=1):
        assert turn["websocket"] == {"connection": upgrade["id"], "exchange": n}
        assert turn["model"] == "gpt-5-2025-08-07" and turn["stream"] is True
        assert turn["usage"] == usage(425, 612, read=1920, reasoning=448)
        assert turn["cost_usd"] == gpt5 and turn["error"] is None
        assert turn["request"]["reasoning_effort"] == "medium" and turn["stop_reason"] == "completed"
    assert turns[0]["id"] != turns[1]["id"] != upgrade["id"]


GEMINI = "https://generativelanguage.googleapis.com/v1beta/models"


def test_gemini_streams_in_every_encoding_over_http1_and_http2(testbed, tap):
    encodings = ["", "gzip", "deflate", "br", "zstd"]
    out = client(testbed, tap, f"""
        results = {{}}
        for i, encoding in enumerate({encodings!r}):
            results[encoding or "identity"] = fetch(
                "{GEMINI}/gemini-2.5-flash:streamGenerateContent?alt=sse&t=gm-" + (encoding or "id"),
                {{"contents": [], "systemInstruction": {{"parts": [{{"text": "Sei kurz."}}]}}}},
                {{"x-fake-encoding": encoding}} if encoding else {{}}, http2=i % 2 == 1)
            results["whole-" + (encoding or "identity")] = fetch(
                "{GEMINI}/gemini-2.5-pro:generateContent?t=gw-" + (encoding or "id"), {{}},
                {{"x-fake-encoding": encoding}} if encoding else {{}}, http2=i % 2 == 0)
        results["array"] = fetch("{GEMINI}/gemini-2.5-flash:streamGenerateContent?t=gm-array", {{}},
                                 http2=True)
        results["json"] = fetch("{GEMINI}/gemini-2.5-pro:generateContent?t=gm-json&key=AIzaFakeKey123",
                                {{"generationConfig": {{"maxOutputTokens": 99}}}})
        results["count"] = fetch("{GEMINI}/gemini-2.5-pro:countTokens?t=gm-count", {{}})
        print(json.dumps(results))
    """)
    fixture = fake_providers.fixture_reply("gemini_stream.sse", {}, "")
    flash = cost(input=(114, "0.30"), output=(368, "2.50"), read=(4096, "0.03"))
    for encoding in encodings:
        sent = b"".join(fake_providers.wire_pieces(fixture, encoding or None))
        assert body_of(out[encoding or "identity"]) == sent, encoding  # still encoded, unchanged
        [record] = records(tap, "gm-" + (encoding or "id"), 1)
        assert (record["api"], record["model"], record["stream"]) == (
            "streamGenerateContent", "gemini-2.5-flash", True)
        assert record["usage"] == usage(114, 368, read=4096, reasoning=320), encoding
        assert record["cost_usd"] == flash and record["error"] is None
        assert record["request"]["system_sha256"] == hashlib.sha256(b"Sei kurz.").hexdigest()
        [whole] = records(tap, "gw-" + (encoding or "id"), 1)  # not streamed, same encoding
        assert whole["usage"] == usage(1500, 120, reasoning=100) and whole["error"] is None, encoding
    assert {out[e]["http"] for e in ("identity", "gzip")} == {"HTTP/1.1", "HTTP/2"}
    assert body_of(out["array"]) == streams.gemini_stream_json()
    assert out["array"]["times"][-1] - out["array"]["times"][0] > 0.2  # a JSON stream, not held
    [array] = records(tap, "gm-array", 1)
    assert array["usage"] == usage(114, 368, read=4096, reasoning=320) and array["stream"] is True
    [whole] = records(tap, "gm-json", 1)
    assert whole["usage"] == usage(1500, 120, reasoning=100) and whole["request"]["max_tokens"] == 99
    assert whole["cost_usd"] == cost(input=(1500, "1.25"), output=(120, "10"))
    assert "AIzaFakeKey123" not in json.dumps(whole)
    [count] = records(tap, "gm-count", 1)
    assert count["cost_usd"] == 0.0 and count["counted_input_tokens"] == 31


def test_errors_rate_limits_and_unknown_paths(testbed, tap):
    out = client(testbed, tap, """
        import anthropic
        sdk = anthropic.Anthropic(api_key="sk-ant-placeholder", max_retries=0,
                                  http_client=anthropic.DefaultHttpxClient(verify=CA))
        try:
            sdk.messages.create(model="claude-opus-4-1", max_tokens=10, messages=[],
                                extra_query={"t": "er-529"},
                                extra_headers={"x-fake-fixture": "anthropic_error_529.json"})
        except anthropic.APIStatusError as exc:
            overloaded = [exc.status_code, type(exc).__name__]
        print(json.dumps({"overloaded": overloaded,
            "429": fetch("https://api.openai.com/v1/chat/completions?t=er-429", {"model": "gpt-4o"},
                         {"x-fake-fixture": "openai_error_429.json"}),
            "stream": fetch("https://api.anthropic.com/v1/messages?t=er-stream",
                            {"model": "claude-opus-4-1", "stream": True},
                            {"x-fake-fixture": "anthropic_overloaded_stream.sse"}),
            "unknown": fetch("https://api.openai.com/v1/files?t=er-unknown", method="GET")}))
    """)
    assert out["overloaded"][0] == 529
    assert out["429"]["status"] == 429 and body_of(out["429"]) == streams.load("openai_error_429.json")
    assert body_of(out["stream"]) == streams.anthropic_overloaded_stream()
    [overloaded] = records(tap, "er-529", 1)
    assert overloaded["status"] == 529 and overloaded["error"] == "overloaded_error: Overloaded"
    assert overloaded["rate_limit"]["retry-after"] == "7"
    assert overloaded["request_id"] == "req_011CSHoEeqs5C35K2UUqR7Fy"
    assert overloaded["usage"]["input_tokens"] is None and overloaded["cost_usd"] is None
    [limited] = records(tap, "er-429", 1)
    assert limited["error"].startswith("tokens: Rate limit reached for gpt-4o")
    assert limited["rate_limit"] == {"retry-after-ms": "2000", "x-ratelimit-remaining-tokens": "0",
                                     "x-ratelimit-reset-tokens": "2s"}
    [stream] = records(tap, "er-stream", 1)
    assert stream["error"] == "overloaded_error: Overloaded" and stream["stream"] is True
    assert stream["usage"]["input_tokens"] == 25  # billed up to the error
    [unknown] = records(tap, "er-unknown", 1)
    assert (unknown["provider"], unknown["api"], unknown["status"]) == ("openai", "unknown", 200)
    assert unknown["error"] is None
    assert (unknown["counted"], unknown["cost_usd"]) == (False, 0.0)  # a files listing: no call
    assert json.loads(body_of(out["unknown"]))["path"] == "/v1/files"  # relayed


BIG = 50 * 1024 * 1024
BOMB = 256 * 1024 * 1024


def test_bad_input_is_relayed_recorded_and_never_stops_other_clients(testbed, tap):
    bad = {
        "truncated": {"x-fake-fixture": "anthropic_messages_stream.sse", "x-fake-truncate": "1500"},
        "aborted": {"x-fake-fixture": "anthropic_messages_stream.sse", "x-fake-abort": "700"},
        "invalid": {"x-fake-body": '{"type": "message", "usage": {"input_tok'},
        "mislabelled": {"x-fake-fixture": "anthropic_message.json", "x-fake-lie-encoding": "gzip"},
        "big": {"x-fake-big": str(BIG)},
        "bomb": {"x-fake-bomb": str(BOMB)},  # asked as a stream: inflated as it passes
        "bomb-held": {"x-fake-bomb": str(BOMB)},  # a whole body mitmproxy holds: parsed on a thread
    }
    out = client(testbed, tap, f"""
        bad = {bad!r}
        results = {{}}
        def call(name, headers, http2=False):
            ask = {{"model": "claude-sonnet-4-5", "stream": name != "bomb-held"}}
            results[name] = fetch("https://api.anthropic.com/v1/messages?t=bad-" + name, ask,
                                  headers, http2)
        slow = threading.Thread(target=call, args=("slow", {{
            "x-fake-fixture": "anthropic_messages_stream.sse", "x-fake-pause-ms": "15"}}, True))
        slow.start()
        workers = [threading.Thread(target=call, args=item) for item in bad.items()]
        for worker in workers:
            worker.start()
        for worker in workers + [slow]:
            worker.join()
        call("after", {{"x-fake-fixture": "anthropic_messages_stream.sse"}})
        for result in results.values():  # 50 MB of base64 is too much for a pipe: a digest will do
            data = base64.b64decode(result["body"])
            result.update(body=base64.b64encode(data[:4096]).decode(), size=len(data),
                          sha256=hashlib.sha256(data).hexdigest())
        print(json.dumps(results))
    """)
    stream = streams.anthropic_messages_stream()
    for name in ("slow", "after"):  # the others were served, in full, all along
        assert body_of(out[name]) == stream[:4096] and out[name]["size"] == len(stream)
        [record] = records(tap, f"bad-{name}", 1)
        assert record["error"] is None and record["cost_usd"] == SONNET_STREAM_COST
    assert body_of(out["truncated"]) == stream[:1500]
    assert body_of(out["aborted"]).startswith(stream[:600])
    assert out["invalid"]["size"] == len(bad["invalid"]["x-fake-body"])
    assert body_of(out["mislabelled"]) == streams.anthropic_message()
    assert out["big"]["sha256"] == hashlib.sha256(fake_providers.big_reply(BIG).body).hexdigest()
    for name in ("bomb", "bomb-held"):
        assert out[name]["sha256"] == hashlib.sha256(fake_providers.bomb(BOMB)).hexdigest()
    found = {name: records(tap, f"bad-{name}", 1)[0] for name in bad}
    assert found["truncated"]["error"] == "llmtap: stream ended inside an SSE event"
    assert found["truncated"]["usage"]["cache_read_tokens"] == 10240  # message_start had arrived
    assert "llmtap: stream ended" in found["aborted"]["error"]
    assert found["aborted"]["error"] != "llmtap: stream ended inside an SSE event"  # + the cut
    assert found["invalid"]["error"].startswith("llmtap: invalid JSON body")
    assert found["mislabelled"]["error"].startswith("llmtap: corrupt gzip body")
    big = found["big"]
    assert big["error"] == "llmtap: body over 8388608 bytes: parsed best-effort"
    assert big["usage"]["output_tokens"] == 64000 and big["model"] == "claude-sonnet-4-5-20250929"
    for name in ("bomb", "bomb-held"):
        assert found[name]["error"] == "llmtap: decoded body over 67108864 bytes (decompression bomb?)"
    assert (found["bomb"]["stream"], found["bomb-held"]["stream"]) == (True, False)
    assert tap.proc.poll() is None and tap.status()["running"]


LITELLM = {
    "mystery-model-1": {"litellm_provider": "anthropic", "mode": "chat",
                        "input_cost_per_token": 2e-06, "output_cost_per_token": 9e-06},
    "azure/gpt-4o": {"litellm_provider": "azure", "mode": "chat",
                     "input_cost_per_token": 1, "output_cost_per_token": 1},
}


def test_unknown_models_cost_null_until_prices_are_imported(testbed, tap):
    call = """
        import anthropic
        sdk = anthropic.Anthropic(api_key="sk-ant-placeholder", max_retries=0,
                                  http_client=anthropic.DefaultHttpxClient(verify=CA))
        sdk.messages.create(model="mystery-model-1", max_tokens=10, messages=[],
                            extra_query={"t": "TAG"})
        print("{}")
    """
    client(testbed, tap, call.replace("TAG", "px-before"))
    [before] = records(tap, "px-before", 1)
    assert before["model"] == "mystery-model-1" and before["usage"]["output_tokens"] == 12
    assert before["cost_usd"] is None and before["price"] is None  # unknown, never 0
    refused = tap.llmtap("prices", "show", "mystery-model-1", check=False)
    assert refused.returncode == 1 and "no price for model 'mystery-model-1'" in refused.stderr
    missing = tap.llmtap("prices", "missing").stdout
    assert "mystery-model-1  1 calls  at api.anthropic.com  (still unpriced)" in missing

    litellm = tap.root / "litellm.json"
    litellm.write_text(json.dumps(LITELLM))
    imported = tap.llmtap("prices", "import", str(litellm))
    assert imported.stdout.startswith("imported 1 model prices")
    override = tap.state_dir / "prices.json"
    assert override.stat().st_mode & 0o777 == 0o644 and override.owner() == "llmtap"
    shown = tap.llmtap("prices", "show", "mystery-model-1").stdout
    assert "input 2, output 9" in shown and "source: override" in shown
    assert "input_mtok: 3 (above" in tap.llmtap("prices", "show", "claude-sonnet-4-5-20250929").stdout
    assert "(priced now by mystery-model-1)" in tap.llmtap("prices", "missing").stdout

    time.sleep(2.5)  # the worker re-reads a changed override within two seconds
    client(testbed, tap, call.replace("TAG", "px-after"))
    [after] = records(tap, "px-after", 1)
    assert after["cost_usd"] == cost(input=(25, "2"), output=(12, "9"))
    assert after["price"]["row"] == "mystery-model-1" and after["price"]["source"] == "override"
    bad = tap.llmtap("prices", "import", str(tap.root / "missing.json"), check=False)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("missing.json is not a file")


UPDATED_PRICES = [{
    "id": "anthropic", "name": "Anthropic", "api_pattern": "https://api\\.anthropic\\.com",
    "models": [{"id": "mystery-model-2", "match": {"equals": "mystery-model-2"},
                "prices": {"input_mtok": 5, "output_mtok": 11}}],
}]


def test_prices_update_reaches_the_running_daemon_and_records_say_so(testbed, tap):
    call = """
        import anthropic
        sdk = anthropic.Anthropic(api_key="sk-ant-placeholder", max_retries=0,
                                  http_client=anthropic.DefaultHttpxClient(verify=CA))
        for model in ("mystery-model-2", "claude-sonnet-4-5-20250929"):
            sdk.messages.create(model=model, max_tokens=10, messages=[], extra_query={"t": "TAG"})
        print("{}")
    """
    data = tap.root / "genai-prices-data.json"
    data.write_text(json.dumps(UPDATED_PRICES))
    updated = tap.llmtap("prices", "update", "--url", data.as_uri())
    assert updated.stdout.startswith(f"prices updated: 1 models from {data.as_uri()}")
    stored = tap.state_dir / "genai-prices.json"
    assert stored.owner() == "llmtap" and stored.stat().st_mode & 0o777 == 0o644
    time.sleep(2.5)  # the worker re-reads changed price files within two seconds
    client(testbed, tap, call.replace("TAG", "pu-after"))
    mystery, sonnet = records(tap, "pu-after", 2)
    assert mystery["cost_usd"] == cost(input=(25, "5"), output=(12, "11"))
    assert mystery["price"]["source"] == "genai-prices"
    assert mystery["price"]["version"].startswith("fetched ")
    assert mystery["price"]["row"] == "anthropic/mystery-model-2"
    # What the update lacks is still priced by the bundled data.
    assert sonnet["price"]["version"].endswith(" bundled") and sonnet["cost_usd"] > 0
    stored.unlink()  # the session's daemon goes back to the bundled data for the tests after this


def test_no_addon_failed_along_the_way(tap):
    """Last in this module: everything above went through the pipeline without an addon error."""
    assert tap.proc.poll() is None
    log = tap.stderr()
    assert "Addon error" not in log and "Traceback" not in log, log
