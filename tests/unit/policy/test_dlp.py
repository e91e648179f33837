"""DLP: every built-in detector with positive and negative samples, the actions, streamed bodies,
the [dlp] config section, and the filters and dlp addons alone (mitmproxy's test helpers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llmtap import dlp
from llmtap.addons import bodies
from llmtap.addons import dlp as dlp_addon
from llmtap.addons.dlp import Dlp
from llmtap.addons.filters import Filters
from llmtap.addons.replies import refusal
from llmtap.addons.streams import StreamChain, Streams
from llmtap.config import load_config
from llmtap.dlp import BUILTIN, Detector, Scanner, StreamRedactor, card_number, escape_safe
from llmtap.errors import UsageError
from llmtap.flow import fields
from llmtap.masking import SecretMask
from llmtap.rules import Body, Protected, Rule, RuleStore, validate
from mitmproxy.test import taddons, tflow

PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
       "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
       "-----END RSA PRIVATE KEY-----")
SAMPLES: dict[str, tuple[list[str], list[str]]] = {
    # detector: (texts it must find a secret in, texts it must not)
    "aws_access_key": (["key=AKIAIOSFODNN7EXAMPLE;", "ASIAY34FZKBOKMUTVV7A"],
                       ["AKIAIOSFODNN7EXAMPL", "XAKIAIOSFODNN7EXAMPLE", "AKIAiosfodnn7example"]),
    "aws_secret_key": (["aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                        '"AWS_SECRET_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"'],
                       ["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_key = short"]),
    "gcp_service_account": (['{"type": "service_account", "private_key_id": "'
                             + "0123456789abcdef" * 2 + '01234567"}'],
                            ['"private_key_id": "not-hex"', '{"key_id": "' + "a" * 40 + '"}']),
    "github_token": (["ghp_" + "A1b2" * 9, "github_pat_" + "a" * 22 + "_" + "B" * 59],
                     ["ghp_short", "ghx_" + "A" * 36]),
    "gitlab_token": (["glpat-" + "aB3_-" * 4], ["glpat-short", "gl-pat-" + "a" * 20]),
    "slack_token": (["xoxb-123456789012-abcdefABCDEF",
                     "https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX"],
                    ["xoxz-123456789012-abc", "xoxb-short"]),
    "private_key": ([PEM, "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n",
                     "-----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END PRIVATE KEY-----"],
                    ["-----BEGIN PUBLIC KEY-----\nMIIBIjANBg\n-----END PUBLIC KEY-----",
                     "-----BEGIN CERTIFICATE-----"]),
    "jwt": (["Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N"],
            ["eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGciOiJIUzI1NiJ9..", "eyJhb.eyJzd.x"]),
    "llm_api_key": (["sk-ant-api03-" + "x" * 90, "sk-proj-" + "Ab_-" * 12,
                     "sk-" + "a1B2" * 12, "AIza" + "b" * 35, "gsk_" + "c" * 52,
                     "sk-or-v1-" + "0f" * 32, "hf_" + "d" * 34],
                    ["sk-short", "task-" + "a" * 40, "AIza" + "b" * 10, "desk-" + "a" * 40]),
    "credit_card": (["card 4111 1111 1111 1111 exp 12/29", "5555555555554444",
                     "amex 3782-822463-10005", "6011111111111117,4012888888881881",
                     "paid with 4111111111111111."],
                    ["4111111111111112", "1234567812345678", "order 1700000000000",
                     "41111111111111111111111", "4111 1111 1111"]),
}


def scanner(**actions: str) -> Scanner:
    return Scanner([Detector(name, b.pattern, actions.get(name, "redact"), b.validate, b.prefilter)
                    for name, b in BUILTIN.items()])


def found(text: str) -> list[str]:
    body = Body.parse(json.dumps({"messages": [{"role": "user", "content": text}]}).encode(), "")
    assert isinstance(body, Body)
    return [f.detector for f in scanner().scan(body.strings(Protected()))]


def test_every_builtin_detector_has_samples() -> None:
    assert set(SAMPLES) == set(BUILTIN)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_builtin_detector_positive_and_negative(name: str) -> None:
    positives, negatives = SAMPLES[name]
    for text in positives:
        assert name in found(text), text
    for text in negatives:
        assert name not in found(text), text


POSITIVES = [text for positives, _ in SAMPLES.values() for text in positives]


@given(st.lists(st.one_of(st.sampled_from(POSITIVES),
                          st.text(alphabet='ab9 "\\\n\té-_./:=\u2028', max_size=6)), max_size=6),
       st.booleans())
@settings(max_examples=300, deadline=None)
def test_prefilter_never_misses_what_the_detectors_find(pieces: list[str], ascii_only: bool) -> None:
    """A raw body the prefilter passes over is not parsed: it must see all the detectors see."""
    text = "".join(pieces)
    raw = json.dumps({"messages": [{"content": text}]}, ensure_ascii=ascii_only).encode()
    if found(text):
        assert scanner().may_find(raw)


def test_a_clean_body_is_not_even_parsed() -> None:
    assert not scanner().may_find(b'{"messages":[{"content":"nothing to see, 12345"}]}')
    user = Detector("mine", "x+y", "alert")  # user patterns have no prefilter
    assert Scanner([user]).may_find(b"{}")


def test_two_cards_side_by_side_and_card_number_spans() -> None:
    assert found("6011111111111117,4012888888881881").count("credit_card") == 2
    assert card_number("2024-01-15 4111 1111 1111 1111") == (11, 30)
    assert card_number("4111 1111 1111 1111 22") == (0, 19)
    assert card_number("0000000000000000") is None  # Luhn-valid, but no issuer


def redacted(text: str, **actions: str) -> tuple[str, list[Any]]:
    body = Body.parse(json.dumps({"t": text}).encode(), "")
    assert isinstance(body, Body)
    strings = body.strings(Protected())
    findings = scanner(**actions).scan(strings)
    return dlp.redact_text(strings.values[0], [f for f in findings if f.action == "redact"]), findings


def test_redaction_uses_typed_markers_and_only_the_secret_group() -> None:
    text, _ = redacted("a AKIAIOSFODNN7EXAMPLE b 4111-1111-1111-1111 c")
    assert text == "a [REDACTED:aws_access_key] b [REDACTED:credit_card] c"
    text, _ = redacted("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n")
    assert text == "aws_secret_access_key=[REDACTED:aws_secret_key]\n"
    text, _ = redacted(f"key:\n{PEM}\nend")
    assert text == "key:\n[REDACTED:private_key]\nend"


def test_alert_and_block_findings_are_not_redacted() -> None:
    text, findings = redacted("AKIAIOSFODNN7EXAMPLE ghp_" + "a" * 36, aws_access_key="alert",
                              github_token="block")
    assert text.startswith("AKIAIOSFODNN7EXAMPLE ghp_")
    assert sorted((f.detector, f.action) for f in findings) == [
        ("aws_access_key", "alert"), ("github_token", "block")]


def test_protected_fields_are_not_scanned() -> None:
    doc = {"content": [{"type": "image", "source": {"type": "base64", "data": "AKIAIOSFODNN7EXAMPLE"}},
                       {"type": "thinking", "thinking": "t", "signature": "AKIAIOSFODNN7EXAMPLE"}]}
    body = Body.parse(json.dumps(doc).encode(), "")
    assert isinstance(body, Body)
    assert scanner().scan(body.strings(Protected())) == []


def test_user_patterns_and_actions_from_config(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[dlp]\ndefault_action = "alert"\n[dlp.actions]\ncredit_card = "off"\n'
                      'jwt = "block"\n[[dlp.patterns]]\nname = "employee_id"\n'
                      'pattern = "EMP-(?P<secret>[0-9]{6})"\naction = "redact"\n')
    detectors = {d.name: d.action for d in dlp.detectors_from_config(load_config(config).dlp)}
    assert detectors["employee_id"] == "redact" and detectors["jwt"] == "block"
    assert detectors["aws_access_key"] == "alert" and "credit_card" not in detectors
    found_user = Scanner([d for d in dlp.detectors_from_config(load_config(config).dlp)
                          if d.name == "employee_id"])
    body = Body.parse(b'{"t":"id EMP-123456."}', "")
    assert isinstance(body, Body)
    strings = body.strings(Protected())
    [finding] = found_user.scan(strings)
    assert dlp.redact_text(strings.values[0], [finding]) == "id EMP-[REDACTED:employee_id]."


@pytest.mark.parametrize(("toml", "message"), [
    ('[dlp]\ndefault_action = "shout"', "dlp.default_action"),
    ('[dlp.actions]\njwt = "drop"', "dlp.actions.jwt"),
    ('[dlp.actions]\nnope = "block"', "unknown config key 'dlp.actions.nope'"),
    ('[[dlp.patterns]]\nname = "jwt"\npattern = "x"', "not a built-in"),
    ('[[dlp.patterns]]\nname = "Bad Name"\npattern = "x"', "lowercase"),
    ('[[dlp.patterns]]\nname = "a"\npattern = "(?=x)"', "not supported by RE2"),
    ('[[dlp.patterns]]\nname = "a"\npattern = "x*"', "empty string"),
    ('[rules]\nextra_protected_fields = ["a b"]', "rules.protected_fields"),
])
def test_bad_dlp_config_is_refused_naming_the_key(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml + "\n")
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        load_config(config)


def test_dlp_disabled_has_no_detectors(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[dlp]\nenabled = false\n")
    assert dlp.detectors_from_config(load_config(config).dlp) == []


# --- streamed bodies ---


def stream_through(data: bytes, chunk: int, **actions: str) -> tuple[bytes, list[dlp.Finding]]:
    found_: list[dlp.Finding] = []
    redactor = StreamRedactor(scanner(**actions), found_.append, window=64)
    out = b"".join(redactor(data[i:i + chunk]) for i in range(0, len(data), chunk))
    return out + redactor(b""), found_


@pytest.mark.parametrize("chunk", [1, 7, 50, 1000])
def test_stream_redactor_finds_secrets_split_across_chunks(chunk: int) -> None:
    secret = "ghp_" + "Z" * 36
    body = json.dumps({"t": "x" * 100 + f" {secret} " + "y" * 100 + " AKIAIOSFODNN7EXAMPLE"}).encode()
    out, findings = stream_through(body, chunk)
    assert len(out) == len(body)  # the content-length was sent before the body
    token, key = dlp.fitted_marker("github_token", 40), dlp.fitted_marker("aws_access_key", 20)
    assert json.loads(out) == {"t": "x" * 100 + f" {token.decode()} " + "y" * 100 + f" {key.decode()}"}
    assert [f.detector for f in findings] == ["github_token", "aws_access_key"]


def test_stream_redactor_holds_back_at_most_its_window() -> None:
    redactor = StreamRedactor(scanner(), lambda f: None, window=64)
    assert redactor(b"a" * 1000) == b"a" * 936
    assert redactor(b"b" * 10) == b"a" * 10
    assert redactor(b"") == b"a" * 54 + b"b" * 10


def test_streamed_json_stays_valid_around_escapes() -> None:
    text = ('he said \\"ghp_' + "Q" * 36
            + '\\" and -----BEGIN PRIVATE KEY-----\\nMII\\n-----END PRIVATE KEY-----')
    out, _ = stream_through(('{"t":"' + text + '"}').encode(), 5)
    said = json.loads(out)["t"]
    assert said.startswith('he said "[REDACTED:github_token*') and " and [REDACTED:private_key*" in said


def test_fitted_markers_keep_the_length() -> None:
    assert dlp.fitted_marker("jwt", 20) == b"[REDACTED:jwt******]"
    assert dlp.fitted_marker("aws_access_key", 20) == b"[REDACTED**********]"
    assert dlp.fitted_marker("aws_access_key", 4) == b"****"


def test_escape_safe_widens_spans_inside_escapes() -> None:
    data = b'a\\"secret\\"b'
    assert escape_safe(data, 2, 9) == (1, 9)  # starts after a backslash: take the backslash
    assert escape_safe(data, 3, 10) == (3, 11)  # ends on a backslash: take what it escapes
    assert escape_safe(b"a\\\\b", 3, 4) == (3, 4)  # an escaped backslash is not an escape


def test_stream_chain_keeps_the_end_signal_for_the_end() -> None:
    seen: list[bytes] = []

    def inner(chunk: bytes) -> bytes:
        seen.append(chunk)
        return chunk.upper()

    stream = StreamChain([StreamRedactor(scanner(), lambda f: None, window=4), inner])
    assert stream(b"abcdef") == [b"AB"]
    assert stream(b"gh") == [b"CD"]
    assert stream(b"") == [b"EFGH"]
    assert seen == [b"ab", b"cd", b"efgh", b""]


# --- block responses ---


@pytest.mark.parametrize(("provider", "path"), [
    ("anthropic", ("error", "type")), ("openai", ("error", "type")), ("google", ("error", "status"))])
def test_block_responses_are_provider_shaped(provider: str, path: tuple[str, str]) -> None:
    response = refusal(provider, 403, "no", "llmtap_dlp_blocked", "dlp")
    body = json.loads(response.content or b"")
    assert response.status_code == 403
    assert body[path[0]][path[1]] in ("permission_error", "PERMISSION_DENIED")
    if provider == "anthropic":
        assert body["type"] == "error"
    if provider == "google":
        assert body["error"]["code"] == 403


def test_block_responses_to_bedrock_are_aws_shaped() -> None:
    response = refusal("bedrock", 403, "no", "llmtap_dlp_blocked", "dlp")
    assert json.loads(response.content or b"") == {"message": "no"}
    assert response.headers["x-amzn-errortype"] == "AccessDeniedException"


# --- the addons alone ---


def make_flow(doc: Any, host: str = "api.anthropic.com", path: str = "/v1/messages"):  # type: ignore[no-untyped-def]
    flow = tflow.tflow()
    flow.request.host = host
    flow.request.path = path
    flow.request.headers["content-type"] = "application/json"
    flow.request.headers["x-stainless-os"] = "Linux"
    flow.request.content = json.dumps(doc).encode()
    return flow


def config_file(tmp_path: Path, toml: str = "") -> str:
    path = tmp_path / "c.toml"
    path.write_text(f'state_dir = "{tmp_path}"\nrecords_dir = "{tmp_path}/r"\n{toml}\n')
    return str(path)


def test_filters_then_dlp_on_one_flow(tmp_path: Path) -> None:
    store = RuleStore(tmp_path / "rules.db")
    store.add(validate(Rule("header", "remove", "contains", "stainless")))
    store.add(validate(Rule("body", "text_replace", "contains", "internal.corp", "example.com")))
    filters, scan = Filters(dlp_follows=True), Dlp()
    with taddons.context(filters, scan) as tctx:
        tctx.configure(filters, llmtap_state_dir=str(tmp_path),
                       llmtap_config_file=config_file(tmp_path))
        tctx.configure(scan, llmtap_config_file=config_file(tmp_path))
        flow = make_flow({"messages": [{"role": "user",
                                        "content": "internal.corp AKIAIOSFODNN7EXAMPLE"}]})
        filters.requestheaders(flow)
        filters.request(flow)
        scan.request(flow)
    assert "x-stainless-os" not in flow.request.headers
    sent = json.loads(flow.request.content or b"")
    assert sent["messages"][0]["content"] == "example.com [REDACTED:aws_access_key]"
    record = fields(flow)
    assert [h["id"] for h in record["rules_hit"]] == [1, 2]
    assert record["dlp_hits"] == [{"detector": "aws_access_key", "action": "redact",
                                   "location": "body messages[0].content", "count": 1}]
    assert "AKIA" not in json.dumps(record)
    assert int(flow.request.headers["content-length"]) == len(flow.request.content or b"")


def test_a_sigv4_signed_body_that_must_change_is_blocked_not_sent_with_a_broken_signature(
        tmp_path: Path) -> None:
    scan = Dlp()
    with taddons.context(scan) as tctx:
        tctx.configure(scan, llmtap_config_file=config_file(tmp_path))
        flow = make_flow({"messages": [{"role": "user", "content": [{"text": "AKIAIOSFODNN7EXAMPLE"}]}]},
                         "bedrock-runtime.us-east-1.amazonaws.com", "/model/m/converse")
        flow.request.headers["authorization"] = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251202/..."
        sent = flow.request.content
        scan.request(flow)
    assert flow.request.content == sent  # never changed under the client's signature
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.response.headers["x-amzn-errortype"] == "AccessDeniedException"
    assert "signed it (AWS SigV4)" in json.loads(flow.response.content or b"")["message"]
    assert fields(flow)["dlp_hits"][0]["detector"] == "aws_access_key"


def test_compressed_bodies_are_read_and_written_back_compressed(tmp_path: Path) -> None:
    RuleStore(tmp_path / "rules.db").add(validate(Rule("body", "text_replace", "contains", "a.corp", "b")))
    filters, scan = Filters(dlp_follows=True), Dlp()
    with taddons.context(filters, scan) as tctx:
        tctx.configure(filters, llmtap_state_dir=str(tmp_path), llmtap_config_file="")
        tctx.configure(scan, llmtap_config_file="")
        flow = make_flow({})
        flow.request.headers["content-encoding"] = "gzip"
        flow.request.content = json.dumps({"t": "a.corp AKIAIOSFODNN7EXAMPLE"}).encode()
        filters.request(flow)
        scan.request(flow)
    assert flow.request.raw_content is not None and flow.request.raw_content[:2] == b"\x1f\x8b"
    assert json.loads(flow.request.content or b"") == {"t": "b [REDACTED:aws_access_key]"}
    assert bodies.take_over(flow) is None  # handed over


def test_filters_alone_write_the_body_themselves(tmp_path: Path) -> None:
    RuleStore(tmp_path / "rules.db").add(validate(Rule("body", "json_path", "exact", "a", "2")))
    filters = Filters()
    with taddons.context(filters) as tctx:
        tctx.configure(filters, llmtap_state_dir=str(tmp_path), llmtap_config_file="")
        flow = make_flow({"a": 1})
        filters.request(flow)
    assert json.loads(flow.request.content or b"") == {"a": 2}


def test_filters_reload_rules_without_restart(tmp_path: Path) -> None:
    filters = Filters()
    with taddons.context(filters) as tctx:
        tctx.configure(filters, llmtap_state_dir=str(tmp_path), llmtap_config_file="")
        flow = make_flow({})
        filters.requestheaders(flow)
        assert "x-stainless-os" in flow.request.headers
        RuleStore(tmp_path / "rules.db").add(validate(Rule("header", "remove", "exact",
                                                           "x-stainless-os")))
        flow = make_flow({})
        filters.requestheaders(flow)
        assert "x-stainless-os" not in flow.request.headers


def test_dlp_block_answers_403_and_records_no_secret(tmp_path: Path) -> None:
    scan = Dlp()
    with taddons.context(scan) as tctx:
        tctx.configure(scan, llmtap_config_file=config_file(
            tmp_path, '[dlp.actions]\naws_access_key = "block"\ncredit_card = "alert"'))
        flow = make_flow({"messages": [{"content": "AKIAIOSFODNN7EXAMPLE 4111111111111111"}]},
                         host="api.openai.com", path="/v1/chat/completions")
        scan.request(flow)
    assert flow.response is not None and flow.response.status_code == 403
    kept = json.loads(flow.request.content or b"")["messages"][0]["content"]
    assert kept == "[REDACTED:aws_access_key] [REDACTED:credit_card]"
    error = json.loads(flow.response.content or b"")["error"]
    assert error["code"] == "llmtap_dlp_blocked" and "aws_access_key" in error["message"]
    assert "AKIA" not in error["message"]
    hits = {h["detector"]: h["action"] for h in fields(flow)["dlp_hits"]}
    assert hits == {"aws_access_key": "block", "credit_card": "alert"}
    assert "AKIA" not in json.dumps(fields(flow)) and "4111" not in json.dumps(fields(flow))


def test_dlp_alert_leaves_the_body_alone(tmp_path: Path) -> None:
    scan = Dlp()
    with taddons.context(scan) as tctx:
        tctx.configure(scan, llmtap_config_file=config_file(tmp_path, '[dlp]\ndefault_action = "alert"'))
        flow = make_flow({"t": "AKIAIOSFODNN7EXAMPLE"})
        before = flow.request.content
        scan.request(flow)
        assert flow.request.content == before and flow.response is None  # sent as it was
        assert fields(flow)["dlp_hits"][0]["action"] == "alert"
        scan.responseheaders(flow)  # it has left: what the recorder keeps is scrubbed
    assert json.loads(flow.request.content or b"") == {"t": "[REDACTED:aws_access_key]"}


def test_streamed_request_is_redacted_and_a_block_cuts_the_exchange(tmp_path: Path) -> None:
    scan = Dlp()
    with taddons.context(scan) as tctx:
        tctx.configure(scan, llmtap_config_file=config_file(
            tmp_path, '[dlp.actions]\ngithub_token = "block"'))
        flow = tflow.tflow()
        flow.request.stream = True
        Streams(request=(scan,)).requestheaders(flow)
        stream = flow.request.stream
        assert callable(stream)
        data = b'{"t":"ghp_' + b"A" * 36 + b' AKIAIOSFODNN7EXAMPLE"}'
        out = b"".join(b"".join(stream(data[i:i + 10])) for i in range(0, len(data), 10))
        out += b"".join(stream(b""))
        assert json.loads(out) == {"t": "[REDACTED:github_token" + "*" * 17 + "] [REDACTED" + "*" * 10 + "]"}
        scan.request(flow)
        scan.responseheaders(flow)
    assert {h["detector"] for h in fields(flow)["dlp_hits"]} == {"github_token", "aws_access_key"}
    assert {h["location"] for h in fields(flow)["dlp_hits"]} == {dlp_addon.STREAMED}
    assert flow.error is not None  # killed: the client does not get a reply


def test_body_rules_on_a_streamed_request_are_recorded_as_missed(tmp_path: Path) -> None:
    store = RuleStore(tmp_path / "rules.db")
    store.add(validate(Rule("header", "remove", "exact", "x-stainless-os")))
    store.add(validate(Rule("body", "text_replace", "contains", "a", "b")))
    filters = Filters()
    with taddons.context(filters) as tctx:
        tctx.configure(filters, llmtap_state_dir=str(tmp_path), llmtap_config_file="")
        flow = make_flow({})
        flow.request.stream = True
        filters.requestheaders(flow)
        filters.request(flow)
    assert "x-stainless-os" not in flow.request.headers  # headers are still rewritten
    assert fields(flow)["rules_missed"][0]["id"] == 2
    assert "streamed" in fields(flow)["rules_missed"][0]["reason"]


def test_streamed_request_without_a_scanner_in_place_is_recorded_as_skipped(tmp_path: Path) -> None:
    scan = Dlp()
    with taddons.context(scan) as tctx:
        tctx.configure(scan, llmtap_config_file=config_file(tmp_path))
        flow = tflow.tflow()
        flow.request.stream = True
        scan.request(flow)
    assert "dlp_skipped" in fields(flow)


def test_free_text_is_masked_with_every_builtin_detector():
    from llmtap.records.capture import mask_secrets

    line = "deploy --aws AKIAIOSFODNN7EXAMPLE --gh ghp_" + "a1" * 18 + " naïve"
    masked = mask_secrets(line)
    assert "AKIAIOSFODNN7EXAMPLE" not in masked and "a1a1a1" not in masked
    assert "[REDACTED:aws_access_key]" in masked and masked.endswith(" naïve")


class Held:
    """The credentials stage as the DLP stage sees it: the held keys, and who was told."""

    def __init__(self, *values: str) -> None:
        self.values = values
        self.marked: list[str] = []

    def mask(self) -> SecretMask:
        return SecretMask(self.values)

    def key_bearing(self, flow: Any) -> None:
        self.marked.append(flow.id)


AZURE_KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"  # no prefix any detector knows


@pytest.mark.parametrize("written", [
    AZURE_KEY,
    "".join(f"\\u{ord(c):04x}" for c in AZURE_KEY[:4]) + AZURE_KEY[4:],  # JSON escapes
])
def test_a_held_key_in_a_body_is_redacted_by_value_whatever_its_json_escapes(tmp_path: Path,
                                                                             written: str) -> None:
    scan = Dlp(held=Held(AZURE_KEY))
    with taddons.context(scan) as tctx:
        tctx.configure(scan, llmtap_config_file=config_file(tmp_path))
        flow = make_flow({})
        flow.request.content = ('{"messages": [{"content": "use ' + written + ' please"}]}').encode()
        scan.request(flow)
    sent = json.loads(flow.request.content or b"")
    assert sent["messages"][0]["content"] == "use [REDACTED:held_key] please"
    assert fields(flow)["dlp_hits"][0]["detector"] == "held_key"
    assert AZURE_KEY not in (flow.request.content or b"").decode()


def test_an_escaped_llm_key_is_found_by_the_builtin_detector_too(tmp_path: Path) -> None:
    scan = Dlp()
    with taddons.context(scan) as tctx:
        tctx.configure(scan, llmtap_config_file=config_file(tmp_path))
        flow = make_flow({})
        key = "sk-ant-api03-" + "A" * 90 + "AA"
        flow.request.content = ('{"t": "\\u0073' + key[1:] + '"}').encode()
        scan.request(flow)
    assert "sk-ant" not in (flow.request.content or b"").decode()
    assert fields(flow)["dlp_hits"][0]["detector"] == "llm_api_key"


def test_a_held_key_let_through_makes_the_response_scrubbed(tmp_path: Path) -> None:
    held = Held(AZURE_KEY)
    scan = Dlp(held=held)
    with taddons.context(scan) as tctx:
        tctx.configure(scan, llmtap_config_file=config_file(tmp_path, '[dlp.actions]\nheld_key = "alert"'))
        flow = make_flow({"t": AZURE_KEY})
        scan.request(flow)
    assert json.loads(flow.request.content or b"") == {"t": AZURE_KEY}  # sent as it was
    assert held.marked == [flow.id]
