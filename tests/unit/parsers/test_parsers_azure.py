"""Azure OpenAI: classification by host and path, the deployment in the record, the model from the
reply, content filter results (and the first chunk with empty choices), the include_usage rewrite
only where the api-version accepts it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llmtap.parsers import UsageChunkStripper, parse_request, response_parser, usage_rewrite
from llmtap.parsers.classify import classify, host_provider
from llmtap.records.capture import MASK, masked_headers
from parser_helpers import T0, body, cuts_for, run, split, stable, usage
from streams import load

STREAM = "azure_chat_stream.sse"
HOST = "myres.openai.azure.com"
DEPLOYMENT_PATH = "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"


@pytest.mark.parametrize(("host", "provider"), [
    ("myres.openai.azure.com", "azure"),
    ("MyRes.OpenAI.Azure.com.", "azure"),
    ("myres.cognitiveservices.azure.com", "azure"),
    ("myres.services.ai.azure.com", "azure"),
    ("openai.azure.com", None),  # the domain itself is no resource
    ("a.b.openai.azure.com", None),
    ("myres.openai.azure.com.attacker.example", None),
    ("openai.azure.com.evil", None),
])
def test_azure_hosts(host: str, provider: str | None) -> None:
    assert host_provider(host) == provider


@pytest.mark.parametrize(("method", "path", "api"), [
    ("POST", "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21", "chat.completions"),
    ("POST", "/openai/deployments/davinci/completions?api-version=2024-10-21", "completions"),
    ("POST", "/openai/deployments/emb/embeddings?api-version=2024-10-21", "embeddings"),
    ("POST", "/openai/responses?api-version=2025-04-01-preview", "responses"),
    ("POST", "/openai/v1/responses", "responses"),
    ("POST", "/openai/v1/chat/completions", "chat.completions"),
    ("POST", "/models/chat/completions?api-version=2024-05-01-preview", "chat.completions"),
    ("GET", "/openai/deployments?api-version=2024-10-21", "unknown"),
])
def test_azure_routes(method: str, path: str, api: str) -> None:
    assert classify(HOST, method, path) == ("azure", api)


def test_deployment_request_keeps_the_deployment_not_a_model() -> None:
    # The SDK copies the deployment into the body's model: it is no model name.
    info = parse_request(HOST, "POST", DEPLOYMENT_PATH, body({
        "model": "gpt4o-prod", "stream": True, "max_tokens": 64,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}))
    assert (info.provider, info.api, info.model, info.stream, info.max_tokens) == (
        "azure", "chat.completions", None, True, 64)
    assert info.record()["deployment"] == "gpt4o-prod"
    assert info.record()["api_version"] == "2024-10-21"
    assert info.system_sha256 is not None


def test_v1_request_has_a_model() -> None:
    info = parse_request(HOST, "POST", "/openai/v1/chat/completions",
                         body({"model": "gpt-4o", "messages": []}))
    assert info.model == "gpt-4o" and "deployment" not in info.record()
    assert info.record()["api_version"] == "v1"


def test_stream_with_prompt_filter_chunk_and_usage() -> None:
    result = run(STREAM)
    assert (result["provider"], result["api"], result["stream"]) == ("azure", "chat.completions", True)
    assert result["model"] == "gpt-4o-2024-11-20"  # from the reply; the first chunk's "" is ignored
    assert result["usage"] == usage(input_tokens=250, output_tokens=11, cache_read_tokens=1280)
    assert result["stop_reason"] == "stop"
    assert result["response_id"] == "chatcmpl-AaBbCcDdEeFf0123456789AzureX"
    assert result["error"] is None and "content_filter" not in result
    assert result["ttft_ms"] is not None


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_rechunking_gives_the_same_result(data: st.DataObject) -> None:
    raw = load(STREAM)
    assert stable(run(STREAM, split(raw, data.draw(cuts_for(raw))))) == stable(run(STREAM))


def test_json_reply() -> None:
    result = run("azure_chat.json")
    assert (result["provider"], result["model"], result["stream"]) == ("azure", "gpt-4o-2024-11-20", False)
    assert result["usage"] == usage(input_tokens=25, output_tokens=11)
    assert result["stop_reason"] == "stop"


def test_filtered_categories_are_recorded() -> None:
    raw = load(STREAM).replace(
        b'"violence":{"filtered":false,"severity":"safe"}},"delta":{"content":" Azure"}',
        b'"violence":{"filtered":true,"severity":"medium"}},"delta":{"content":" Azure"}')
    assert run(STREAM, [raw])["content_filter"] == ["violence"]


def test_content_filter_refusal() -> None:
    result = run("azure_error_content_filter.json")
    assert result["error"].startswith("content_filter: The response was filtered")


@pytest.mark.parametrize(("path", "rewritten"), [
    (DEPLOYMENT_PATH, True),
    ("/openai/deployments/d/chat/completions?api-version=2025-01-01-preview", True),
    ("/openai/deployments/d/chat/completions?api-version=2024-06-01", False),  # refuses it: 400
    ("/openai/deployments/d/chat/completions", False),
    ("/openai/v1/chat/completions", True),
    ("/openai/v1/chat/completions?api-version=preview", True),
])
def test_include_usage_only_where_the_api_version_takes_it(path: str, rewritten: bool) -> None:
    raw = body({"messages": [{"role": "user", "content": "Hi"}], "stream": True})
    info = parse_request(HOST, "POST", path, raw)
    change = usage_rewrite(info, raw)
    assert change.strip_usage_chunk is rewritten
    if rewritten:
        assert json.loads(change.body)["stream_options"] == {"include_usage": True}


def test_stripper_keeps_the_prompt_filter_chunk() -> None:
    # The first chunk also has empty choices, but no usage: only the usage chunk goes.
    stripper = UsageChunkStripper()
    out = b"".join(stripper.feed(piece) for piece in split(load(STREAM), range(5, 4000, 97)))
    out += stripper.feed(b"")
    assert out == load("azure_chat_stream_stripped.sse")


def test_the_api_key_header_is_masked_in_records() -> None:
    headers = masked_headers([("api-key", "0123456789abcdef0123456789abcdef"), ("Api-Key", "x" * 32),
                              ("x-ms-region", "Sweden Central")])
    assert headers == [("api-key", MASK), ("Api-Key", MASK), ("x-ms-region", "Sweden Central")]


@pytest.mark.parametrize("path", ["/openai/v1/responses", "/openai/responses?api-version=2025-04-01-preview"])
def test_responses_on_azure(path: str) -> None:
    info = parse_request(HOST, "POST", path, body({"model": "gpt-4.1-mini", "input": "hi"}))
    parser = response_parser(info, started=T0, headers={"content-type": "application/json"})
    parser.feed(load("openai_responses.json"), T0 + 0.2)
    parser.feed(b"", T0 + 0.3)
    result = parser.result()
    assert (result["provider"], result["api"], result["error"]) == ("azure", "responses", None)
    assert result["model"] == json.loads(load("openai_responses.json"))["model"]
    assert result["usage"]["output_tokens"]
