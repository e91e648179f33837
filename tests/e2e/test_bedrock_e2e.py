"""AWS Bedrock runtime end to end: boto3's bedrock-runtime client and anthropic's AnthropicBedrock in
the client namespace, no proxy settings, the real regional host name (resolved by the test bed's
hosts file, a target through targets.extra_hosts), the llmtap CA as the CA bundle.

The fake upstream checks every SigV4 signature as AWS does (tests/support/fake_bedrock.py): a 200 means the
request reached the provider exactly as the client signed it. Requests are tagged `t=`, signed in.
"""

from __future__ import annotations

import json
import re
import secrets
import textwrap
from collections.abc import Iterator
from typing import Any

import fake_bedrock
import pytest
import streams
from test_credentials_e2e import exports, set_secret
from test_protocols_e2e import CLIENT, body_of, cost, records, upstream_seen, usage
from testbed import BEDROCK_HOST, Daemon, Testbed, running_daemon

pytestmark = pytest.mark.root

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
HAIKU = "us.anthropic.claude-haiku-4-5-20251001-v1:0"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEFAKEsessiontoken" + "x" * 40

BOTO = f"""
import boto3
from botocore.config import Config
TAG = {{"t": "", "headers": {{}}}}

def tag(request, **kwargs):  # before signing, so the tag and the steering headers are signed too
    request.url += ("&" if "?" in request.url else "?") + "t=" + TAG["t"]
    for name, value in TAG["headers"].items():
        request.headers[name] = value

def bedrock(**credentials):
    sdk = boto3.client("bedrock-runtime", region_name="us-east-1", verify=CA,
                       config=Config(retries={{"total_max_attempts": 1}}), **credentials)
    sdk.meta.events.register("before-sign.bedrock-runtime.*", tag)
    return sdk

SIGV4 = dict(aws_access_key_id="{fake_bedrock.ACCESS_KEY}",
             aws_secret_access_key="{fake_bedrock.SECRET_KEY}", aws_session_token="{SESSION_TOKEN}")
ASK = [{{"role": "user", "content": [{{"text": "Weather in Paris?"}}]}}]
CLAUDE = {{"anthropic_version": "bedrock-2023-05-31", "max_tokens": 1024,
          "messages": [{{"role": "user", "content": "Weather in Paris?"}}]}}
"""


@pytest.fixture(scope="module")
def tap(testbed: Testbed) -> Iterator[Daemon]:
    with running_daemon(testbed, extra_hosts=(BEDROCK_HOST,)) as daemon:
        yield daemon


def run(testbed: Testbed, daemon: Daemon, code: str, env: dict[str, str] | None = None) -> Any:
    """Client code after the httpx helpers (fetch) and the boto3 ones above; its last printed line
    is one JSON value. No proxy variables: only the names resolve to the fake upstream."""
    script = CLIENT + textwrap.dedent(BOTO) + textwrap.dedent(code)
    result = testbed.python(script, env={"LLMTAP_CA": str(daemon.ca_pem), **(env or {})})
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_no_aws_secret_in_records(daemon: Daemon) -> None:
    """Neither the access key id, the session token nor a signature in any record file."""
    for path in (p for p in daemon.records_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for secret in (fake_bedrock.ACCESS_KEY, fake_bedrock.SECRET_KEY, SESSION_TOKEN[:24]):
            assert secret.encode() not in data, f"{secret[:8]}… in {path}"
        assert not re.search(rb"Signature=[0-9a-f]{64}", data), path


def test_boto3_invoke_and_converse_streamed_and_not(testbed, tap):
    out = run(testbed, tap, f"""
        sdk = bedrock(**SIGV4)
        TAG["t"] = "b-invoke"
        whole = json.loads(sdk.invoke_model(modelId="{HAIKU}", body=json.dumps(CLAUDE))["body"].read())
        TAG["t"] = "b-invoke-stream"
        reply = sdk.invoke_model_with_response_stream(modelId="{SONNET}", body=json.dumps(CLAUDE))
        events = [json.loads(e["chunk"]["bytes"]) for e in reply["body"]]
        TAG["t"] = "b-converse"
        conversed = sdk.converse(modelId="{HAIKU}", messages=ASK, system=[{{"text": "Be brief."}}],
                                 inferenceConfig={{"maxTokens": 512, "temperature": 0.2}})
        TAG["t"] = "b-converse-stream"
        streamed = [e for e in sdk.converse_stream(modelId="{SONNET}", messages=ASK)["stream"]]
        TAG["t"] = "b-count"
        counted = sdk.count_tokens(modelId="{SONNET}", input={{"converse": {{"messages": ASK}}}})
        print(json.dumps({{"whole": whole["usage"], "types": [e["type"] for e in events],
                          "conversed": conversed["usage"], "stop": conversed["stopReason"],
                          "streamed": [next(iter(e)) for e in streamed],
                          "last": streamed[-1]["metadata"]["usage"], "count": counted["inputTokens"]}}))
    """)
    assert out["whole"]["cache_read_input_tokens"] == 3000 and out["types"][-1] == "message_stop"
    assert out["conversed"]["inputTokens"] == 385 and out["stop"] == "tool_use"
    assert out["streamed"][0] == "messageStart" and out["streamed"][-2:] == ["messageStop", "metadata"]
    assert out["last"]["cacheWriteInputTokens"] == 1024 and out["count"] == 1337

    [invoke] = records(tap, "b-invoke", 1)
    assert (invoke["provider"], invoke["api"], invoke["model"], invoke["stream"]) == (
        "bedrock", "invoke", HAIKU, False)
    assert invoke["usage"] == usage(2095, 503, read=3000, w1h=1000, reasoning=None)
    assert invoke["request"]["max_tokens"] == 1024 and invoke["error"] is None
    assert invoke["request_id"] == fake_bedrock.REQUEST_ID
    [invoke_stream] = records(tap, "b-invoke-stream", 1)
    assert (invoke_stream["api"], invoke_stream["model"], invoke_stream["stream"]) == (
        "invoke-with-response-stream", SONNET, True)
    assert invoke_stream["usage"] == usage(472, 189, read=10240, w5m=1536, w1h=512, reasoning=None)
    assert invoke_stream["stop_reason"] == "tool_use" and invoke_stream["error"] is None
    assert invoke_stream["cost_usd"] == cost(input=(472, "3.3"), output=(189, "16.5"), read=(10240, "0.33"),
                                             w5m=(1536, "4.125"), w1h=(512, "6.6"))
    assert 0 < invoke_stream["ttft_ms"] < invoke_stream["duration_ms"] - 200  # parsed as it passed
    [converse] = records(tap, "b-converse", 1)
    assert (converse["api"], converse["model"], converse["stream"]) == ("converse", HAIKU, False)
    assert converse["usage"] == usage(385, 71, read=2048, w5m=512, reasoning=None)
    # the host decides whose prices apply: AWS's, the us. cross-region profile's (+10%) here
    assert converse["cost_usd"] == cost(input=(385, "1.1"), output=(71, "5.5"), read=(2048, "0.11"),
                                        w5m=(512, "1.375"))
    assert converse["price"]["row"] == "aws/regional.anthropic.claude-haiku-4-5-20251001-v1:0"
    assert converse["request"]["system_sha256"] is not None and converse["request"]["temperature"] == 0.2
    [converse_stream] = records(tap, "b-converse-stream", 1)
    assert (converse_stream["api"], converse_stream["stream"]) == ("converse-stream", True)
    assert converse_stream["usage"] == usage(1210, 96, read=3072, w1h=1024, reasoning=None)
    assert converse_stream["chunks"] > 50 and converse_stream["error"] is None
    [count] = records(tap, "b-count", 1)
    assert (count["api"], count["counted"], count["counted_input_tokens"]) == ("count-tokens", False, 1337)
    assert count["cost_usd"] == 0.0

    seen = [r for t in ("b-invoke", "b-converse-stream") for r in upstream_seen(testbed, t)]
    assert all(r["headers"]["authorization"].startswith("AWS4-HMAC-SHA256 Credential=") for r in seen)
    assert all(r["headers"]["x-amz-security-token"] == SESSION_TOKEN for r in seen)  # not replaced
    assert_no_aws_secret_in_records(tap)


def test_the_stream_reaches_the_client_byte_for_byte_and_as_it_comes(testbed, tap):
    out = run(testbed, tap, f"""
        raw = fetch("https://{BEDROCK_HOST}/model/{SONNET}/converse-stream?t=b-raw",
                    {{"messages": ASK}}, {{"x-fake-pause-ms": "20"}})
        print(json.dumps(raw))
    """)
    assert body_of(out) == streams.load("bedrock_converse_stream.eventstream")
    times = out["times"]  # ~80 pieces 20 ms apart upstream: they arrive as they were sent
    assert len(times) > 20 and times[-1] - times[0] > 0.8
    [record] = records(tap, "b-raw", 1)
    assert record["stream"] is True and record["chunks"] > 20 and record["error"] is None


def test_bedrock_errors_are_recorded_with_aws_error_types(testbed, tap):
    out = run(testbed, tap, f"""
        import botocore.exceptions
        sdk = bedrock(**SIGV4)
        TAG.update(t="b-429", headers={{"x-fake-fixture": "bedrock_error_429.json"}})
        try:
            sdk.converse(modelId="{SONNET}", messages=ASK)
        except botocore.exceptions.ClientError as exc:
            throttled = exc.response["Error"]["Code"]
        cut = "bedrock_converse_stream_throttled.eventstream"
        TAG.update(t="b-midway", headers={{"x-fake-fixture": cut}})
        try:
            [e for e in sdk.converse_stream(modelId="{SONNET}", messages=ASK)["stream"]]
        except botocore.exceptions.EventStreamError as exc:
            midway = exc.response["Error"]["Code"]
        TAG.update(t="b-badsig", headers={{}})
        sdk = bedrock(aws_access_key_id="{fake_bedrock.ACCESS_KEY}", aws_secret_access_key="wrong")
        try:
            sdk.converse(modelId="{SONNET}", messages=ASK)
        except botocore.exceptions.ClientError as exc:
            badsig = exc.response["Error"]["Code"]
        TAG.update(t="b-dlp", headers={{}})
        sdk = bedrock(**SIGV4)
        leak = [{{"role": "user", "content": [{{"text": "my key is AKIAIOSFODNN7EXAMPLF"}}]}}]
        try:
            sdk.converse(modelId="{SONNET}", messages=leak)
        except botocore.exceptions.ClientError as exc:
            dlp = exc.response["Error"]["Code"] + ": " + exc.response["Error"]["Message"]
        print(json.dumps([throttled, midway, badsig, dlp]))
    """)
    assert out[:3] == ["ThrottlingException", "throttlingException", "InvalidSignatureException"]
    # DLP would redact the key, but the body is signed: blocked here, never sent broken
    assert out[3].startswith("AccessDeniedException: llmtap blocked this request: its body must change")
    assert upstream_seen(testbed, "b-dlp") == []
    [throttled] = records(tap, "b-429", 1)
    assert throttled["error"] == "ThrottlingException: Too many requests, please wait before trying again."
    [midway] = records(tap, "b-midway", 1)
    # boto3 raises at the exception message and may hang up before the body's end: that is noted too
    assert midway["error"].endswith("throttlingException: Too many tokens, please wait before trying again.")
    [badsig] = records(tap, "b-badsig", 1)
    assert badsig["error"].startswith("InvalidSignatureException: The request signature we calculated")


def test_anthropic_bedrock_sdk(testbed, tap):
    out = run(testbed, tap, f"""
        import anthropic
        sdk = anthropic.AnthropicBedrock(
            aws_access_key="{fake_bedrock.ACCESS_KEY}", aws_secret_key="{fake_bedrock.SECRET_KEY}",
            aws_region="us-east-1", max_retries=0, http_client=anthropic.DefaultHttpxClient(verify=CA))
        ask = dict(max_tokens=1024, messages=[{{"role": "user", "content": "Weather in Paris?"}}])
        message = sdk.messages.create(model="{HAIKU}", **ask, extra_query={{"t": "ab-json"}})
        with sdk.messages.stream(model="{SONNET}", system="Be brief.", **ask,
                                 extra_query={{"t": "ab-sse"}}) as stream:
            final = stream.get_final_message()
        print(json.dumps({{"json": message.usage.model_dump(), "stream": final.usage.model_dump(),
                          "blocks": [b.type for b in final.content]}}))
    """)
    assert out["json"]["input_tokens"] == 2095 and out["stream"]["output_tokens"] == 189
    assert out["blocks"] == ["text", "tool_use"]
    [whole] = records(tap, "ab-json", 1)
    assert (whole["provider"], whole["api"], whole["model"], whole["stream"]) == (
        "bedrock", "invoke", HAIKU, False)
    assert whole["usage"] == usage(2095, 503, read=3000, w1h=1000, reasoning=None)
    [streamed] = records(tap, "ab-sse", 1)
    assert (streamed["api"], streamed["model"], streamed["stream"]) == (
        "invoke-with-response-stream", SONNET, True)
    assert streamed["usage"] == usage(472, 189, read=10240, w5m=1536, w1h=512, reasoning=None)
    assert streamed["request"]["system_sha256"] is not None and streamed["error"] is None
    assert_no_aws_secret_in_records(tap)


def test_a_bedrock_api_key_is_injected_for_its_placeholder(testbed, tap):
    daemon = tap  # the store is re-read when it changes: no restart
    real = "ABSK" + secrets.token_urlsafe(96)
    placeholder = set_secret(daemon, "bedrock", real, "--host", BEDROCK_HOST)
    assert placeholder.startswith("ABSK") and exports(daemon)["AWS_BEARER_TOKEN_BEDROCK"] == placeholder
    out = run(testbed, daemon, f"""
        import anthropic
        sdk = bedrock()  # boto3 reads AWS_BEARER_TOKEN_BEDROCK
        TAG["t"] = "key-boto"
        sdk.converse(modelId="{SONNET}", messages=ASK)
        claude = anthropic.AnthropicBedrock(api_key=os.environ["AWS_BEARER_TOKEN_BEDROCK"],
                                            aws_region="us-east-1", max_retries=0,
                                            http_client=anthropic.DefaultHttpxClient(verify=CA))
        claude.messages.create(model="{HAIKU}", max_tokens=8, messages=[{{"role": "user", "content": "hi"}}],
                               extra_query={{"t": "key-anthropic"}})
        print(json.dumps("ok"))
    """, env={"AWS_BEARER_TOKEN_BEDROCK": placeholder})
    assert out == "ok"
    for tag, api in (("key-boto", "converse"), ("key-anthropic", "invoke")):
        [seen] = upstream_seen(testbed, tag)
        assert seen["headers"]["authorization"] == f"Bearer {real}"
        [record] = records(daemon, tag, 1)
        assert (record["provider"], record["api"], record["error"]) == ("bedrock", api, None)
    for path in (p for d in (daemon.records_dir, daemon.state_dir) for p in d.rglob("*") if p.is_file()):
        assert real.encode() not in path.read_bytes(), path
    assert real not in daemon.stderr()
