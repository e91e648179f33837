"""OpenAI-compatible APIs on other providers' hosts, and Vertex AI, end to end: the official clients
in the client namespace with no proxy settings, one llmtap daemon tapping those hosts too, the fake
upstream answering in each provider's dialect (tests/support/fake_providers.py).

What every record must have: the host's provider, the wire shape's api, the model, exact usage, the
stream flag, and no error. A streamed compatible call used to be `api: unknown`, and since the SDK
hangs up right after `data: [DONE]`, it also carried a false "Client disconnected" error.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_protocols_e2e import records, tag_of, usage
from testbed import MORE_API_HOSTS, Daemon, Testbed, running_daemon

pytestmark = pytest.mark.root

VERTEX_HOST = "us-central1-aiplatform.googleapis.com"
TOKEN = "ya29.a0AfB_byC-llmtapFakeAccessToken0123456789abcdefghij"  # Google OAuth access token

PRELUDE = """
import json, os
import openai
CA = os.environ["LLMTAP_CA"]
os.environ["SSL_CERT_FILE"] = CA  # google-genai's httpx client reads it
TOKEN = os.environ["FAKE_TOKEN"]

def compat(base_url, key="placeholder-key"):
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0,
                         http_client=openai.DefaultHttpxClient(verify=CA))

def dump(stream):
    return [c.model_dump() for c in stream]
"""


def run_client(testbed: Testbed, daemon: Daemon, code: str) -> Any:
    """Runs client code in the client namespace; it prints one JSON value as its last line."""
    env = {"LLMTAP_CA": str(daemon.ca_pem), "FAKE_TOKEN": TOKEN}
    result = testbed.python(PRELUDE + textwrap.dedent(code), env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tap(testbed: Testbed) -> Iterator[Daemon]:
    with running_daemon(testbed, extra_hosts=MORE_API_HOSTS) as daemon:
        yield daemon


def by_path(daemon: Daemon, piece: str, expected: int, timeout: float = 15) -> list[dict[str, Any]]:
    """Records whose path holds `piece` (clients that cannot add a query tag put it in the path)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in daemon.records() if piece in (r.get("path") or "")]
        if len(found) >= expected or time.monotonic() > deadline:
            return sorted(found, key=lambda r: r["started_at"])
        time.sleep(0.1)


def upstream_bodies(testbed: Testbed, tag: str) -> list[dict[str, Any]]:
    seen = [r for r in testbed.upstream_requests() if tag_of("?" + r["query"]) == tag]
    return [json.loads(r["body"]) for r in seen]


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def assert_clean(record: dict[str, Any], provider: str, api: str, model: str, streamed: bool) -> None:
    found = (record["provider"], record["api"], record["model"], record["stream"], record["error"])
    assert found == (provider, api, model, streamed, None)
    if api != "messages.count_tokens":  # priced at the host's provider's rates
        assert record["cost_usd"] and record["price"]["row"].startswith(f"{provider}/"), record["price"]


def test_gemini_openai_compat_streamed_and_not(testbed, tap):
    out = run_client(testbed, tap, """
        sdk = compat("https://generativelanguage.googleapis.com/v1beta/openai/")
        ask = dict(model="gemini-2.5-flash", messages=[{"role": "user", "content": "Capital?"}])
        chunks = dump(sdk.chat.completions.create(**ask, stream=True, extra_query={"t": "gem-sse"},
                                                  extra_headers={"x-fake-pause-ms": "50"}))
        whole = sdk.chat.completions.create(**ask, extra_query={"t": "gem-json"})
        print(json.dumps({"chunks": chunks, "whole": whole.model_dump()}))
    """)
    assert text_of(out["chunks"]) == "Paris is the capital of France — bien sûr. 🇫🇷"
    assert out["whole"]["usage"]["total_tokens"] == 408
    [streamed] = records(tap, "gem-sse", 1)
    assert_clean(streamed, "google", "chat.completions", "gemini-2.5-flash", True)
    # completion_tokens 14 + the 383 thought tokens only total_tokens counts.
    assert streamed["usage"] == usage(13, 397, read=2048, reasoning=383)
    assert streamed["stop_reason"] == "stop"
    # The SDK hangs up once it has `data: [DONE]`, before the body's end (50 ms later): a note.
    assert streamed["notes"] == ["Client disconnected. (after the complete response)"]
    [whole] = records(tap, "gem-json", 1)
    assert_clean(whole, "google", "chat.completions", "gemini-2.5-flash", False)
    assert whole["usage"] == usage(11, 397, reasoning=383)
    # llmtap asked Gemini for the usage; it came on the last chunk, which the client keeps.
    [sent] = upstream_bodies(testbed, "gem-sse")
    assert sent["stream_options"] == {"include_usage": True}


def test_anthropic_openai_compat_streamed_and_not(testbed, tap):
    out = run_client(testbed, tap, """
        sdk = compat("https://api.anthropic.com/v1/")
        ask = dict(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "Salut"}])
        chunks = dump(sdk.chat.completions.create(**ask, stream=True, extra_query={"t": "antc-sse"}))
        whole = sdk.chat.completions.create(**ask, max_tokens=64, extra_query={"t": "antc-json"})
        print(json.dumps({"chunks": chunks, "whole": whole.model_dump()}))
    """)
    assert text_of(out["chunks"]) == "Bonjour ! Comment puis-je vous aider ?"
    # The usage-only chunk llmtap asked for is not passed on: the client sees what it asked for.
    assert all(c["choices"] and c["usage"] is None for c in out["chunks"])
    [streamed] = records(tap, "antc-sse", 1)
    assert_clean(streamed, "anthropic", "chat.completions", "claude-sonnet-4-5-20250929", True)
    assert streamed["usage"] == usage(25, 12)
    [whole] = records(tap, "antc-json", 1)
    assert_clean(whole, "anthropic", "chat.completions", "claude-sonnet-4-5-20250929", False)
    assert whole["usage"] == usage(25, 12) and whole["request"]["max_tokens"] == 64


def test_groq_openrouter_deepseek_mistral_streams(testbed, tap):
    out = run_client(testbed, tap, """
        ask = dict(messages=[{"role": "user", "content": "Hi"}], stream=True)
        groq = dump(compat("https://api.groq.com/openai/v1").chat.completions.create(
            model="llama-3.3-70b-versatile", **ask, extra_query={"t": "groq"}))
        router = dump(compat("https://openrouter.ai/api/v1").chat.completions.create(
            model="anthropic/claude-sonnet-4.5", **ask, extra_query={"t": "router"}))
        deep = dump(compat("https://api.deepseek.com").chat.completions.create(
            model="deepseek-reasoner", **ask, extra_query={"t": "deep"}))
        mistral = dump(compat("https://api.mistral.ai/v1").chat.completions.create(
            model="mistral-large-latest", **ask, extra_query={"t": "mistral"}))
        print(json.dumps({"groq": groq, "router": router, "deep": deep, "mistral": mistral}))
    """)
    assert text_of(out["groq"]) == "Hola! ¿En qué puedo ayudarte?"
    assert out["router"][-1]["usage"]["cost"] == 0.0070434  # OpenRouter's usage reaches the client
    assert text_of(out["deep"]) == "17 \u00d7 23 = 391."
    [groq] = records(tap, "groq", 1)
    assert_clean(groq, "groq", "chat.completions", "llama-3.3-70b-versatile", True)
    assert groq["usage"] == usage(48, 15) and groq["service_tier"] == "on_demand"
    [router] = records(tap, "router", 1)
    assert_clean(router, "openrouter", "chat.completions", "anthropic/claude-sonnet-4.5", True)
    assert router["usage"] == usage(93, 310, read=2048, w5m=400)
    assert router["provider_cost_usd"] == 0.0070434 and router["served_by"] == "Anthropic"
    [deep] = records(tap, "deep", 1)
    assert_clean(deep, "deepseek", "chat.completions", "deepseek-reasoner", True)
    assert deep["usage"] == usage(76, 420, read=1024, reasoning=380)
    # Groq and OpenRouter stream their usage unasked: their requests went out as sent.
    assert "stream_options" not in upstream_bodies(testbed, "groq")[0]
    assert "stream_options" not in upstream_bodies(testbed, "router")[0]
    assert upstream_bodies(testbed, "deep")[0]["stream_options"] == {"include_usage": True}
    # Mistral refuses stream_options (422): llmtap leaves its requests alone; its usage comes anyway.
    assert text_of(out["mistral"]) == "Bonjour, je suis Le Chat."
    [mistral] = records(tap, "mistral", 1)
    assert_clean(mistral, "mistral", "chat.completions", "mistral-large-latest", True)
    assert mistral["usage"] == usage(10, 9)


def test_anthropic_vertex_client(testbed, tap):
    out = run_client(testbed, tap, """
        import anthropic
        sdk = anthropic.AnthropicVertex(region="us-central1", project_id="t-antvertex",
                                        access_token=TOKEN, max_retries=0,
                                        http_client=anthropic.DefaultHttpxClient(verify=CA))
        ask = dict(model="claude-sonnet-4-5@20250929", max_tokens=1024,
                   messages=[{"role": "user", "content": "Weather in Paris?"}])
        whole = sdk.messages.create(**ask)
        with sdk.messages.stream(**ask) as stream:
            final = stream.get_final_message()
        counted = sdk.messages.count_tokens(model=ask["model"], messages=ask["messages"])
        print(json.dumps({"whole": whole.usage.model_dump(), "stream": final.usage.model_dump(),
                          "counted": counted.input_tokens}))
    """)
    assert out["stream"]["output_tokens"] == 189 and out["counted"] > 0
    found = by_path(tap, "/projects/t-antvertex/", 3)
    whole, streamed, counted = _vertex_claude_records(found)
    model = "claude-sonnet-4-5@20250929"
    assert_clean(whole, "google", "messages", model, False)
    assert whole["usage"] == usage(2095, 503, read=3000, w1h=1000, reasoning=None)
    assert_clean(streamed, "google", "messages", model, True)
    assert streamed["usage"] == usage(472, 189, read=10240, w5m=1536, w1h=512, reasoning=None)
    assert (counted["api"], counted["error"]) == ("messages.count_tokens", None)
    assert_token_only_upstream(testbed, tap, "/projects/t-antvertex/")


def _vertex_claude_records(found: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    def one(suffix: str) -> dict[str, Any]:
        [record] = [r for r in found if r["path"].split("?")[0].endswith(suffix)
                    and "count-tokens" not in r["path"]]
        return record
    [counted] = [r for r in found if "count-tokens" in r["path"]]
    return one(":rawPredict"), one(":streamRawPredict"), counted


def test_google_genai_vertex_client(testbed, tap):
    out = run_client(testbed, tap, """
        from google import genai
        from google.oauth2.credentials import Credentials
        client = genai.Client(vertexai=True, project="t-genai", location="us-central1",
                              credentials=Credentials(token=TOKEN))
        whole = client.models.generate_content(model="gemini-2.5-flash", contents="Why blue?")
        text = "".join(c.text or "" for c in client.models.generate_content_stream(
            model="gemini-2.5-flash", contents="Why blue?"))
        print(json.dumps({"whole": whole.text, "stream": text}))
    """)
    assert out["stream"] == "Der Himmel ist blau, weil Rayleigh-Streuung kurze Wellen bevorzugt."
    found = by_path(tap, "/projects/t-genai/", 2)
    [whole] = [r for r in found if r["api"] == "generateContent"]
    [streamed] = [r for r in found if r["api"] == "streamGenerateContent"]
    assert_clean(whole, "google", "generateContent", "gemini-2.5-flash", False)
    assert whole["usage"] == usage(9, 31, reasoning=25)
    assert_clean(streamed, "google", "streamGenerateContent", "gemini-2.5-flash", True)
    assert streamed["usage"] == usage(13, 402, read=2048, reasoning=383)
    assert streamed["host"] == VERTEX_HOST
    assert_token_only_upstream(testbed, tap, "/projects/t-genai/")


def test_vertex_openai_compatible_endpoint(testbed, tap):
    out = run_client(testbed, tap, """
        sdk = compat("https://us-central1-aiplatform.googleapis.com/v1/projects/t-vxoa/locations/"
                     "us-central1/endpoints/openapi", key=TOKEN)  # the OAuth token as bearer
        chunks = dump(sdk.chat.completions.create(
            model="google/gemini-2.5-flash", messages=[{"role": "user", "content": "Capital?"}],
            stream=True, extra_headers={"x-fake-fixture": "gemini_compat_chat_stream.sse"}))
        print(json.dumps({"chunks": chunks}))
    """)
    assert text_of(out["chunks"]).startswith("Paris")
    [record] = by_path(tap, "/projects/t-vxoa/", 1)
    assert_clean(record, "google", "chat.completions", "gemini-2.5-flash", True)
    assert record["request"] is not None and record["host"] == VERTEX_HOST
    assert record["usage"] == usage(13, 397, read=2048, reasoning=383)
    assert_token_only_upstream(testbed, tap, "/projects/t-vxoa/")


def assert_token_only_upstream(testbed: Testbed, daemon: Daemon, piece: str) -> None:
    """Google's OAuth token is signed by the client: it reaches Vertex unchanged, and llmtap's
    records show the header masked, never the token."""
    seen = [r for r in testbed.upstream_requests() if piece in r["path"]]
    assert seen and all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in seen)
    masked = False
    for path in Path(daemon.records_dir).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert TOKEN.encode() not in data and TOKEN[:20].encode() not in data, path
            masked = masked or (piece.encode() in data and "Bearer ••••".encode() in data)
    assert masked  # the Markdown twin shows the header, masked
