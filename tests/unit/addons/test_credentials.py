"""The Credentials addon alone, with mitmproxy's test helpers and a store in a temporary dir."""

from __future__ import annotations

import json
import logging
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from credential_flows import KnownUser, flow_to, respond, run_hook, write_secrets
from fake_providers import bomb
from llmtap import secrets_store as store
from llmtap.addons.credentials import Credentials
from llmtap.addons.echoes import EncodedEchoGuard, StreamScrubber
from llmtap.addons.streams import Streams, layer_of
from llmtap.flow import CREDENTIALS, fields
from mitmproxy import ctx, http
from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage

ANTHROPIC = "sk-ant-api03-REALanthropicKEY0123456789"
OPENAI = "sk-proj-REALopenaiKEY0123456789"
GOOGLE = "AIzaREALgoogleKEY0123456789"
AZURE = "azureREALkey0123456789"


DEFAULT = (
    ("anthropic", ("api.anthropic.com",), "x-api-key", False, ANTHROPIC),
    ("openai", ("api.openai.com",), "authorization", False, OPENAI),
    ("gemini", ("generativelanguage.googleapis.com",), "x-goog-api-key", False, GOOGLE),
    ("azure", ("api.openai.com",), "api-key", False, AZURE),
)


@pytest.fixture
def addon(tmp_path: Path) -> Iterator[tuple[Credentials, dict[str, str], Path]]:
    placeholders = write_secrets(tmp_path, *DEFAULT)
    addon = Credentials()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, llmtap_state_dir=str(tmp_path))
        yield addon, placeholders, tmp_path


@pytest.mark.parametrize("http2", [False, True])
def test_placeholder_becomes_the_real_key_then_goes_back(addon, http2):
    credentials, ph, _ = addon
    flow = flow_to("api.anthropic.com", headers={"x-api-key": ph["anthropic"]}, http2=http2)
    credentials.requestheaders(flow)
    assert flow.request.headers["x-api-key"] == ANTHROPIC
    assert fields(flow)["credential"] == "anthropic"
    respond(credentials, flow)
    # Once sent, the flow shows what the client sent: nothing that logs it sees the key.
    assert flow.request.headers["x-api-key"] == ph["anthropic"]


def test_every_supported_location(addon):
    credentials, ph, _ = addon
    bearer = flow_to("api.openai.com", "/v1/chat/completions",
                     headers={"Authorization": f"Bearer {ph['openai']}"})
    azure = flow_to("api.openai.com", "/v1/chat/completions", headers={"api-key": ph["azure"]})
    goog = flow_to("generativelanguage.googleapis.com", "/v1beta/models/g:generateContent",
                   headers={"x-goog-api-key": ph["gemini"]})
    query_path = f"/v1beta/models/g:streamGenerateContent?alt=sse&key={ph['gemini']}&x=a%20b"
    query = flow_to("generativelanguage.googleapis.com", query_path)
    for flow in (bearer, azure, goog, query):
        credentials.requestheaders(flow)
    assert bearer.request.headers["authorization"] == f"Bearer {OPENAI}"
    assert azure.request.headers["api-key"] == AZURE
    assert goog.request.headers["x-goog-api-key"] == GOOGLE
    assert query.request.path == f"/v1beta/models/g:streamGenerateContent?alt=sse&key={GOOGLE}&x=a%20b"
    respond(credentials, query)
    assert query.request.path == query_path  # restored byte for byte


def test_websocket_upgrade_is_injected_and_server_messages_scrubbed(addon):
    credentials, ph, _ = addon
    flow = flow_to("api.openai.com", "/v1/responses", method="GET", content=b"", headers={
        "connection": "Upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "authorization": f"Bearer {ph['openai']}"})
    credentials.requestheaders(flow)
    assert flow.request.headers["authorization"] == f"Bearer {OPENAI}"
    flow.response = http.Response.make(101, b"", {"upgrade": "websocket"})
    credentials.responseheaders(flow)
    assert flow.request.headers["authorization"] == f"Bearer {ph['openai']}"
    flow.websocket = tflow.twebsocket()
    flow.websocket.messages = [WebSocketMessage(1, False, f'{{"echo": "{OPENAI}"}}'.encode())]
    credentials.websocket_message(flow)
    assert flow.websocket.messages[-1].content == f'{{"echo": "{ph["openai"]}"}}'.encode()


def test_only_an_exact_placeholder_is_replaced(addon):
    credentials, ph, _ = addon
    near = [ph["anthropic"] + "x", ph["anthropic"][:-1], "Bearer " + ph["anthropic"]]
    for value in near:
        flow = flow_to("api.anthropic.com", headers={"x-api-key": value})
        credentials.requestheaders(flow)
        assert flow.request.headers["x-api-key"] == value and flow.response is None
    other = flow_to("api.anthropic.com", headers={"x-other": ph["anthropic"]})
    credentials.requestheaders(other)
    assert other.request.headers["x-other"] == ph["anthropic"]


@pytest.mark.parametrize(("host", "header", "shape"), [
    ("api.openai.com", "x-api-key", lambda b: b["error"]["code"] == "llmtap_credential_blocked"),
    ("api.anthropic.com", "authorization", lambda b: b["type"] == "error"
     and b["error"]["type"] == "permission_error"),
    ("generativelanguage.googleapis.com", "x-goog-api-key",
     lambda b: b["error"]["status"] == "PERMISSION_DENIED"),
])
def test_placeholder_to_an_unbound_host_is_blocked_in_the_providers_shape(addon, host, header, shape,
                                                                          caplog):
    credentials, ph, _ = addon
    name = "openai" if host == "api.anthropic.com" else "anthropic"
    value = f"Bearer {ph[name]}" if header == "authorization" else ph[name]
    flow = flow_to(host, headers={header: value})
    with caplog.at_level(logging.WARNING):
        credentials.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    body = json.loads(flow.response.content or b"")
    assert shape(body)
    assert f"secret {name!r} may only be sent to" in json.dumps(body)
    assert fields(flow)["credential"] == name and "blocked" in fields(flow)["error"]
    assert flow.request.headers[header] == value  # never replaced
    assert ANTHROPIC not in caplog.text and OPENAI not in caplog.text
    assert "blocked this request" in caplog.text


def test_sni_and_host_must_both_be_bound(addon):
    credentials, ph, _ = addon
    flow = flow_to("api.anthropic.com", headers={"x-api-key": ph["anthropic"]})
    flow.client_conn.sni = "api.openai.com"
    credentials.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403


def plain_http(flow: http.HTTPFlow) -> None:
    flow.request.scheme = "http"
    flow.client_conn.tls = flow.server_conn.tls = False


def other_server_sni(flow: http.HTTPFlow) -> None:
    flow.server_conn.sni = "evil.example"  # the connection's certificate is verified for this


def rerouted(flow: http.HTTPFlow) -> None:
    flow.request.data.host = "10.9.9.9"  # Host header kept: a new connection, verified for the IP


def other_port(flow: http.HTTPFlow) -> None:
    flow.request.data.port = 8443
    flow.server_conn.address = ("api.anthropic.com", 8443)


def insecure(flow: http.HTTPFlow) -> None:
    ctx.options.ssl_insecure = True


@pytest.mark.parametrize(("attack", "reason"), [
    (plain_http, "only added over HTTPS"),
    (other_server_sni, "TLS connection verified for api.anthropic.com"),
    (rerouted, "TLS connection verified for api.anthropic.com"),
    (other_port, "redirected ports (443), not 8443"),
    (insecure, "TLS connection verified for api.anthropic.com"),
])
def test_a_key_is_added_only_over_tls_verified_for_a_bound_host(addon, attack, reason, caplog):
    credentials, ph, _ = addon
    flow = flow_to("api.anthropic.com", headers={"x-api-key": ph["anthropic"]})
    attack(flow)
    with caplog.at_level(logging.WARNING):
        credentials.requestheaders(flow)
    assert flow.request.headers["x-api-key"] == ph["anthropic"]  # never replaced
    assert flow.response is not None and flow.response.status_code == 403
    assert reason in (flow.response.content or b"").decode()
    assert reason in fields(flow)["error"] and ANTHROPIC not in caplog.text


@pytest.mark.parametrize("attack", [plain_http, other_server_sni, other_port])
def test_when_absent_adds_nothing_off_verified_tls(tmp_path, attack):
    write_secrets(tmp_path, ("claude", ("api.anthropic.com",), "x-api-key", True, ANTHROPIC))
    addon = Credentials(attribution=KnownUser("alice"))  # type: ignore[arg-type]
    with taddons.context(addon) as tctx:
        tctx.configure(addon, llmtap_state_dir=str(tmp_path))
        flow = flow_to("api.anthropic.com")
        attack(flow)
        run_hook(addon.requestheaders(flow))
        assert "x-api-key" not in flow.request.headers and flow.response is None


def test_a_real_key_sent_by_a_client_in_plain_http_is_stopped(addon):
    credentials, _, _ = addon
    flow = flow_to("api.anthropic.com", headers={"x-api-key": ANTHROPIC})
    plain_http(flow)
    credentials.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403


def test_the_block_names_the_host_that_is_not_bound(addon):
    credentials, ph, _ = addon
    flow = flow_to("api.anthropic.com", headers={"x-api-key": ph["anthropic"]})
    flow.client_conn.sni = "api.openai.com"
    credentials.requestheaders(flow)
    assert "may only be sent to api.anthropic.com, not api.openai.com" in fields(flow)["error"]


def test_when_absent_adds_the_key_only_when_the_client_sends_none(tmp_path):
    ph = write_secrets(tmp_path, ("claude", ("api.anthropic.com",), "x-api-key", True, ANTHROPIC),
                       ("g", ("generativelanguage.googleapis.com",), "query:key", True, GOOGLE))
    addon = Credentials(attribution=KnownUser("alice"))  # type: ignore[arg-type]
    with taddons.context(addon) as tctx:
        tctx.configure(addon, llmtap_state_dir=str(tmp_path))
        bare = flow_to("api.anthropic.com")
        oauth = flow_to("api.anthropic.com", headers={"authorization": "Bearer sk-ant-oat01-own"})
        gemini = flow_to("generativelanguage.googleapis.com", "/v1beta/models?pageSize=5")
        for flow in (bare, oauth, gemini):
            run_hook(addon.requestheaders(flow))
        assert bare.request.headers["x-api-key"] == ANTHROPIC
        assert fields(bare)["credential"] == "claude"
        assert "x-api-key" not in oauth.request.headers and "credential" not in fields(oauth)
        assert gemini.request.path == f"/v1beta/models?pageSize=5&key={GOOGLE}"
        respond(addon, bare)
        assert "x-api-key" not in bare.request.headers  # back to what the client sent
    assert ph["claude"].startswith("sk-ant-api03-")


@pytest.mark.parametrize("user", ["mallory", None])
def test_when_absent_adds_nothing_for_another_or_an_unknown_user(tmp_path, user):
    write_secrets(tmp_path, ("claude", ("api.anthropic.com",), "x-api-key", True, ANTHROPIC))
    addon = Credentials(attribution=KnownUser(user))  # type: ignore[arg-type]
    with taddons.context(addon) as tctx:
        tctx.configure(addon, llmtap_state_dir=str(tmp_path))
        flow = flow_to("api.anthropic.com")
        run_hook(addon.requestheaders(flow))
        assert "x-api-key" not in flow.request.headers and "credential" not in fields(flow)


def test_when_absent_without_users_is_not_applied(tmp_path, caplog):
    write_secrets(tmp_path, ("claude", ("api.anthropic.com",), "x-api-key", True, ANTHROPIC), for_users=())
    paths = store.StorePaths.under(tmp_path)
    document = json.loads(paths.store.read_text())
    document["secrets"][0]["when_absent"] = True  # as an older llmtap wrote it: no users
    paths.store.write_text(json.dumps(document))
    addon = Credentials(attribution=KnownUser("alice"))  # type: ignore[arg-type]
    with taddons.context(addon) as tctx, caplog.at_level(logging.WARNING):
        tctx.configure(addon, llmtap_state_dir=str(tmp_path))
        flow = flow_to("api.anthropic.com")
        run_hook(addon.requestheaders(flow))
        assert "x-api-key" not in flow.request.headers
    assert "--when-absent is not applied without --for-user" in caplog.text


def test_real_key_from_a_client_is_flagged_and_never_logged(addon, caplog):
    credentials, ph, _ = addon
    flow = flow_to("api.anthropic.com", headers={"x-api-key": ANTHROPIC})
    with caplog.at_level(logging.WARNING):
        credentials.requestheaders(flow)
    assert flow.response is None
    assert fields(flow)["credential_alerts"] == [
        {"secret": "anthropic", "where": "x-api-key", "alert": "real key sent by the client"}]
    assert "real key of secret 'anthropic'" in caplog.text and ANTHROPIC not in caplog.text
    respond(credentials, flow, body=f"echo {ANTHROPIC}".encode())
    assert flow.request.headers["x-api-key"] == ph["anthropic"]
    assert flow.response.content == f"echo {ph['anthropic']}".encode()
    leak = flow_to("api.openai.com", headers={"authorization": f"Bearer {ANTHROPIC}"})
    credentials.requestheaders(leak)
    assert leak.response is not None and leak.response.status_code == 403


def test_echoed_key_in_headers_and_bodies_becomes_the_placeholder(addon):
    credentials, ph, _ = addon
    flow = flow_to("api.anthropic.com", headers={"x-api-key": ph["anthropic"]})
    credentials.requestheaders(flow)
    response = respond(credentials, flow, body=f'{{"k": "{ANTHROPIC}"}}'.encode(),  # gzipped by make()
                       headers={"x-echo": f"key={ANTHROPIC}", "content-encoding": "gzip"})
    assert (response.raw_content or b"")[:2] == b"\x1f\x8b"
    assert response.headers["x-echo"] == f"key={ph['anthropic']}"
    assert response.content == f'{{"k": "{ph["anthropic"]}"}}'.encode()
    assert ANTHROPIC.encode() not in (response.raw_content or b"")


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 13, 40, 1000])
def test_stream_scrubber_catches_a_key_split_across_chunks(size):
    pairs = ((ANTHROPIC.encode(), b"PLACEHOLDER-A"), (OPENAI.encode(), b"PLACEHOLDER-O"))
    stream = f"data: {ANTHROPIC}\n\ndata: s sk sk-p {OPENAI}{ANTHROPIC}\n\nsk-ant".encode()
    scrubber = StreamScrubber(pairs, True)
    out = b"".join(scrubber(c) for c in chunked(stream, size)) + scrubber(b"")  # type: ignore[operator]
    assert out == b"data: PLACEHOLDER-A\n\ndata: s sk sk-p PLACEHOLDER-OPLACEHOLDER-A\n\nsk-ant"


def test_stream_scrubber_holds_back_only_what_could_start_a_key():
    scrubber = StreamScrubber(((ANTHROPIC.encode(), b"P"),), True)
    assert scrubber(b'data: {"text": "hello"}\n\n') == b'data: {"text": "hello"}\n\n'
    assert scrubber(b"ends with sk-an") == b"ends with "
    assert scrubber(b"d more") == b"sk-and more"


def test_stream_scrubber_feeds_another_addons_callable_and_ends_it_once():
    seen: list[bytes] = []

    def inner(data: bytes) -> bytes:
        seen.append(data)
        return data.upper()

    scrubber = StreamScrubber(((b"secretkey", b"ph"),), inner)
    out = [scrubber(b"a secr"), scrubber(b"etkey b"), scrubber(b"")]
    assert out == [[b"A "], [b"PH B"], [b""]]
    assert seen == [b"a ", b"ph b", b""]


def test_streamed_response_of_a_key_bearing_flow_is_wrapped_last(addon):
    credentials, ph, _ = addon
    flow = flow_to("api.anthropic.com", headers={"x-api-key": ph["anthropic"]})
    credentials.requestheaders(flow)
    flow.response = http.Response.make(200, b"", {"content-length": "500"})
    credentials.responseheaders(flow)
    flow.response.stream = True  # what a later stage (protocols) decides
    Streams(response=(credentials,)).responseheaders(flow)
    assert layer_of(flow.response.stream, StreamScrubber) is not None
    assert "content-length" not in flow.response.headers
    assert flow.response.headers["transfer-encoding"] == "chunked"
    untouched = flow_to("api.anthropic.com", headers={"x-api-key": "sk-ant-someone-elses"})
    credentials.requestheaders(untouched)
    untouched.response = http.Response.make(200, b"")
    untouched.response.stream = True
    Streams(response=(credentials,)).responseheaders(untouched)
    assert untouched.response.stream is True


def test_rotation_takes_effect_on_the_next_request_and_old_keys_stay_scrubbed(addon):
    credentials, ph, state_dir = addon
    first = flow_to("api.anthropic.com", headers={"x-api-key": ph["anthropic"]})
    credentials.requestheaders(first)
    first.response = http.Response.make(200, b"")
    first.response.stream = True
    open_stream = credentials.response_layer(first)
    rotated = "sk-ant-api03-ROTATEDanthropicKEY987"
    again = write_secrets(state_dir, ("anthropic", ("api.anthropic.com",), "x-api-key", False, rotated),
                          *DEFAULT[1:])
    assert again["anthropic"] == ph["anthropic"]  # the tools keep their placeholder
    second = flow_to("api.anthropic.com", headers={"x-api-key": ph["anthropic"]})
    credentials.requestheaders(second)
    assert second.request.headers["x-api-key"] == rotated
    assert callable(open_stream)
    assert open_stream(f"late echo {ANTHROPIC}\n".encode()) == f"late echo {ph['anthropic']}\n".encode()
    assert respond(credentials, second, body=ANTHROPIC.encode()).content == ph["anthropic"].encode()


def test_unresolvable_reference_answers_with_the_reason(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("LLMTAP_TEST_MISSING", raising=False)
    ph = write_secrets(tmp_path, ("ant", ("api.anthropic.com",), "x-api-key", False,
                                  "env:LLMTAP_TEST_MISSING"))
    addon = Credentials()
    with caplog.at_level(logging.WARNING), taddons.context(addon) as tctx:
        tctx.configure(addon, llmtap_state_dir=str(tmp_path))
        flow = flow_to("api.anthropic.com", headers={"x-api-key": ph["ant"]})
        addon.requestheaders(flow)
    assert "secret 'ant': cannot resolve env:LLMTAP_TEST_MISSING: not set in the daemon's environment" \
        in caplog.text
    assert flow.response is not None and flow.response.status_code == 403
    assert "env:LLMTAP_TEST_MISSING" in (flow.response.text or "")


def test_reference_is_resolved_in_the_daemons_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTAP_TEST_KEY", "sk-ant-api03-fromTheEnvironment")
    ph = write_secrets(tmp_path, ("ant", ("api.anthropic.com",), "x-api-key", False, "env:LLMTAP_TEST_KEY"))
    addon = Credentials()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, llmtap_state_dir=str(tmp_path))
        flow = flow_to("api.anthropic.com", headers={"x-api-key": ph["ant"]})
        addon.requestheaders(flow)
    assert flow.request.headers["x-api-key"] == "sk-ant-api03-fromTheEnvironment"


def test_a_store_with_wrong_modes_is_not_reloaded(addon, caplog):
    credentials, ph, state_dir = addon
    paths = store.StorePaths.under(state_dir)
    write_secrets(state_dir, ("anthropic", ("api.anthropic.com",), "x-api-key", False, "sk-ant-new"))
    paths.store.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        flow = flow_to("api.anthropic.com", headers={"x-api-key": ph["anthropic"]})
        credentials.requestheaders(flow)
    assert flow.request.headers["x-api-key"] == ANTHROPIC  # the old secrets stay in force
    assert "secret store not reloaded: refusing the secret store" in caplog.text
    assert "chmod 640" in caplog.text


def test_last_used_is_written_to_the_workers_own_file(addon):
    credentials, ph, state_dir = addon
    flow = flow_to("api.anthropic.com", headers={"x-api-key": ph["anthropic"]})
    credentials.requestheaders(flow)
    paths = store.StorePaths.under(state_dir)
    [secret] = [s for s in store.read_store(paths) if s.name == "anthropic"]
    usage = store.read_usage(paths)
    assert usage[secret.id].endswith("Z")
    assert (paths.usage.stat().st_mode & 0o777) == 0o600


def test_no_store_no_change(tmp_path):
    addon = Credentials()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, llmtap_state_dir=str(tmp_path))
        flow = flow_to("api.anthropic.com", headers={"x-api-key": "sk-ant-whatever"})
        before = flow.request.copy()
        addon.requestheaders(flow)
        respond(addon, flow)
    assert flow.request.headers == before.headers and CREDENTIALS not in flow.metadata


def test_the_stream_tail_is_behind_every_other_stage():
    from llmtap import addons

    stages = addons.pipeline()
    tail = stages[-1]
    assert isinstance(tail, Streams)
    assert tail.response_stages[0] is addons.stage(stages, Credentials)  # keys out first


def gzip_stream(text: bytes, pieces: int) -> list[bytes]:
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    step = max(1, len(text) // pieces)
    out = [packer.compress(text[i:i + step]) + packer.flush(zlib.Z_SYNC_FLUSH)
           for i in range(0, len(text), step)]
    return [*out, packer.flush()]


@pytest.mark.parametrize("pieces", [1, 3, 17, 200])
def test_a_key_echoed_in_a_gzip_stream_is_cut_before_it_leaves(pieces):
    body = b"data: " + json.dumps({"echo": ANTHROPIC}).encode() + b"\n\n" * 50
    cut: list[str] = []
    guard = EncodedEchoGuard(((ANTHROPIC.encode(), b"PH"),), "gzip", True, cut.append)
    sent = b""
    for chunk in [*gzip_stream(body, pieces), b""]:
        out = guard(chunk)
        sent += out if isinstance(out, bytes) else b"".join(out)
    assert cut == [EncodedEchoGuard.ECHOED]
    seen = zlib.decompressobj(31).decompress(sent)  # what the client can decode of it
    assert ANTHROPIC.encode() not in seen and ANTHROPIC[:-1].encode() not in seen


def test_a_clean_gzip_stream_passes_unchanged_and_in_time():
    body = b"data: {}\n\n" * 400
    guard = EncodedEchoGuard(((ANTHROPIC.encode(), b"PH"),), "gzip", True, lambda why: None)
    chunks = gzip_stream(body, 40)
    outs = [guard(chunk) for chunk in [*chunks, b""]]
    assert b"".join(o if isinstance(o, bytes) else b"".join(o) for o in outs) == b"".join(chunks)
    assert all(outs[:-1])  # nothing held back: no decoded tail could start the key


def test_a_key_bearing_request_asks_for_identity_and_the_flow_keeps_the_clients_header(addon):
    credentials, ph, _ = addon
    flow = flow_to("api.anthropic.com", headers={"x-api-key": ph["anthropic"], "accept-encoding": "gzip, br"})
    credentials.requestheaders(flow)
    assert flow.request.headers["accept-encoding"] == "identity"
    respond(credentials, flow)
    assert flow.request.headers["accept-encoding"] == "gzip, br"
    plain = flow_to("api.anthropic.com", headers={"accept-encoding": "gzip"})
    credentials.requestheaders(plain)
    assert plain.request.headers["accept-encoding"] == "gzip"  # no key, no change


def respond_raw(credentials: Credentials, flow: http.HTTPFlow, raw: bytes, encoding: str) -> http.Response:
    """A held response with its body as the upstream sent it (make() would encode it again)."""
    flow.response = http.Response.make(200, b"", {"content-type": "application/json"})
    flow.response.headers["content-encoding"] = encoding
    flow.response.raw_content = raw
    credentials.responseheaders(flow)
    credentials.response(flow)
    return flow.response


@pytest.mark.parametrize(("raw", "why"), [
    (bomb(64 << 20), "its gzip body decodes to more than 32 MiB"),
    (b"\x1f\x8b not gzip", "its body cannot be decoded (corrupt gzip body"),
])
def test_a_key_bearing_response_that_cannot_be_checked_is_withheld(addon, raw, why):
    credentials, ph, _ = addon
    flow = flow_to("api.anthropic.com", headers={"x-api-key": ph["anthropic"]})
    credentials.requestheaders(flow)
    response = respond_raw(credentials, flow, raw, "gzip")
    assert response.status_code == 502 and response.headers["x-llmtap-blocked"] == "credentials"
    error = json.loads(response.content or b"")
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert why in error["error"]["message"] and "echoed key" in error["error"]["message"]
    assert fields(flow)["error"] == error["error"]["message"]


def test_a_response_without_a_key_is_relayed_untouched_whatever_it_inflates_to(addon):
    credentials, _, _ = addon
    flow = flow_to("api.anthropic.com")
    credentials.requestheaders(flow)
    raw = bomb(64 << 20)
    response = respond_raw(credentials, flow, raw, "gzip")
    assert response.status_code == 200 and response.raw_content is raw


def test_a_compressed_stream_is_watched_one_piece_at_a_time_and_cut_past_the_cap():
    cut: list[str] = []
    guard = EncodedEchoGuard(((ANTHROPIC.encode(), b"PH"),), "gzip", True, cut.append)
    raw = bomb(300 << 20)
    chunks = chunked(raw, 64 * 1024)  # each inflates to 64 MiB
    tracemalloc.start()
    try:
        sent = [guard(chunks[0])]
        _, peak = tracemalloc.get_traced_memory()
        sent += [guard(chunk) for chunk in [*chunks[1:], b""]]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # one decoder piece and the chunk, never the chunk's 64 MiB
    assert sent[0] == chunks[0] and cut == [EncodedEchoGuard.UNCHECKED]
    assert sum(len(s) for s in sent) < len(raw)  # nothing past the cap went on
