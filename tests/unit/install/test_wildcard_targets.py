"""Wildcard targets (`*.openai.azure.com`) and region patterns (`bedrock-runtime.*.amazonaws.com`)
everywhere a target host is used: validation, scope, the forged leaf, the CA's name constraints,
the redirect's names, doctor, and the hosts a secret is bound to (llmtap.hostpatterns)."""

from __future__ import annotations

import dataclasses
import io
import logging
import re
from pathlib import Path

import pytest
from credential_flows import KnownUser, flow_to, respond, run_hook, write_secrets
from cryptography import x509
from cryptography.x509.verification import VerificationError
from llmtap import cli, hostpatterns
from llmtap import secrets_store as store
from llmtap.addons.credentials import Credentials
from llmtap.addons.scope import Scope
from llmtap.ca import KEY_AND_CERT, create_ca, uncovered_hosts
from llmtap.cli.secrets import env_lines
from llmtap.config import Config, TargetsConfig, load_config
from llmtap.errors import UsageError
from llmtap.flow import fields
from llmtap.proxy import leaf_refusal
from llmtap.targets import redirect_names
from mitmproxy.certs import CertStore
from mitmproxy.proxy import context
from mitmproxy.test import taddons, tflow
from test_ca_and_targets import verify
from test_doctor import doctor

AZURE = "*.openai.azure.com"
BEDROCK = "bedrock-runtime.*.amazonaws.com"
VERTEX = "*-aiplatform.googleapis.com"
KEY = "0123456789abcdef0123456789abcdef"  # an Azure key: 32 hex digits

ATTACKS = [
    "openai.azure.com",  # the domain itself
    "a.b.openai.azure.com",  # two labels
    "evil.openai.azure.com.attacker.example",
    "openai.azure.com.evil",
    "myres-openai.azure.com",
    "myres.openai.azure.co",
    "\u212aey.openai.azure.com",  # KELVIN SIGN: lower() makes it "k"
    "m\u00fcnchen.openai.azure.com",  # IDNA in its Unicode form (the wire carries xn--)
    "-bad.openai.azure.com",
    "myres.openai.azure.com\n",
    "",
]


@pytest.mark.parametrize("host", ["myres.openai.azure.com", "MyRes.OpenAI.Azure.COM",
                                  "myres.openai.azure.com.", "xn--mnchen-3ya.openai.azure.com",
                                  "a" * 63 + ".openai.azure.com"])
def test_a_leftmost_wildcard_matches_one_label(host):
    assert hostpatterns.parse(AZURE).matches(host)
    assert hostpatterns.HostSet.of([AZURE]).matches(host)


@pytest.mark.parametrize("host", ATTACKS)
def test_a_leftmost_wildcard_matches_nothing_else(host):
    assert not hostpatterns.parse(AZURE).matches(host)
    assert not hostpatterns.HostSet.of([AZURE, "api.openai.com"]).matches(host)


@pytest.mark.parametrize("pattern", [
    "*", "*.", "*.com", "*.ai", "*.co.uk", "*.com.au", "*.azurewebsites.net", "*.github.io",
    "*.amazonaws.com", "*.googleapis.com", "**.openai.azure.com", "*.*.azure.com",
    "a.*.azure.com", "my*.openai.azure.com", "*.openai.azure.com*", "bedrock-runtime.*",
    "*.openai .azure.com", "*.openai.azure.com/", "*.-x.com", "*.xn--p1ai",
])
def test_overly_broad_or_malformed_patterns_are_refused(pattern):
    with pytest.raises(ValueError):
        hostpatterns.check(pattern)


def test_region_patterns_stand_for_the_shipped_regions_only():
    bedrock, vertex = hostpatterns.parse(BEDROCK), hostpatterns.parse(VERTEX)
    assert bedrock.matches("bedrock-runtime.us-east-1.amazonaws.com")
    assert bedrock.matches("BEDROCK-RUNTIME.eu-central-1.amazonaws.com.")
    assert vertex.matches("us-central1-aiplatform.googleapis.com")
    for host in ("bedrock-runtime.evil.amazonaws.com", "bedrock-runtime.us-east-1.x.amazonaws.com",
                 "s3.us-east-1.amazonaws.com", "bedrock-runtime.us-central1.amazonaws.com",
                 "evil-aiplatform.googleapis.com", "us-east-1-aiplatform.googleapis.com",
                 "x.us-central1-aiplatform.googleapis.com"):
        assert not bedrock.matches(host) and not vertex.matches(host), host
    assert len(bedrock.names) == len(hostpatterns.AWS_REGIONS) and not bedrock.wildcard
    assert "bedrock-runtime.us-west-2.amazonaws.com" in bedrock.names


def test_config_takes_wildcards_and_refuses_broad_ones(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(f'[targets]\nextra_hosts = ["*.OpenAI.Azure.com.", "{BEDROCK}"]\n')
    assert load_config(path).targets.all_hosts[-2:] == (AZURE, BEDROCK)
    path.write_text('[targets]\nextra_hosts = ["*.com"]\n')
    with pytest.raises(UsageError, match=r"targets: '\*.com' needs at least two labels"):
        load_config(path)
    path.write_text('[targets]\nextra_hosts = ["*.co.uk"]\n')
    with pytest.raises(UsageError, match="too broad"):
        load_config(path)


def test_scope_decrypts_one_label_under_a_wildcard_only():
    scope = Scope()
    with taddons.context(scope) as tctx:
        tctx.configure(scope, llmtap_targets=["api.openai.com", AZURE])
        patterns = tctx.options.allow_hosts

    def allowed(address: str) -> bool:  # as mitmproxy's next_layer matches them
        return any(re.search(p, address, re.IGNORECASE) for p in patterns)

    assert allowed("myres.openai.azure.com:443") and allowed("MYRES.openai.azure.com:443")
    assert allowed("api.openai.com:443")
    for host in ATTACKS:
        assert not allowed(f"{host}:443"), host
    assert not allowed("10.0.0.2:443")


@pytest.mark.parametrize("targets", [["*.com"], ["*"], ["a b"]])
def test_scope_refuses_broad_targets(targets):
    scope = Scope()
    with taddons.context(scope) as tctx, pytest.raises(Exception, match="llmtap_targets"):
        tctx.configure(scope, llmtap_targets=targets)


def conn_context(sni: str) -> context.Context:
    client = tflow.tclient_conn()
    client.sni = sni
    return context.Context(client, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("sni", "refused"), [
    ("myres.openai.azure.com", False), ("api.openai.com", False), *((a, True) for a in ATTACKS if a)])
def test_a_leaf_is_forged_only_for_a_name_under_a_wildcard(sni, refused):
    scope = Scope()
    with taddons.context(scope) as tctx:
        tctx.configure(scope, llmtap_targets=["api.openai.com", AZURE])
        reason = leaf_refusal(conn_context(sni))
    assert bool(reason) is refused, reason


@pytest.fixture(scope="module")
def wild_ca(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wildca")
    key_pem, cert_pem = create_ca(("api.openai.com", AZURE, "myres.openai.azure.com", BEDROCK))
    (directory / KEY_AND_CERT).write_bytes(key_pem + cert_pem)
    (directory / "llmtap-ca.pem").write_bytes(cert_pem)
    return CertStore.from_store(directory, "mitmproxy", 2048), cert_pem, directory / "llmtap-ca.pem"


def test_the_ca_vouches_for_names_under_a_wildcard_and_no_other(wild_ca):
    certstore, cert_pem, _ = wild_ca
    for name in ("myres.openai.azure.com", "other.openai.azure.com",
                 "bedrock-runtime.eu-west-1.amazonaws.com"):
        leaf = certstore.get_cert(name, [x509.DNSName(name)]).cert._cert
        verify(cert_pem, leaf, name)
        assert leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [name]
    for name in ("azure.com", "evil.azure.com", "s3.amazonaws.com", "openai.azure.com.evil"):
        leaf = certstore.get_cert(name, [x509.DNSName(name)]).cert._cert
        with pytest.raises(VerificationError):
            verify(cert_pem, leaf, name)


def test_the_ca_is_constrained_to_the_wildcards_domain_not_more(wild_ca):
    _, cert_pem, _ = wild_ca
    cert = x509.load_pem_x509_certificate(cert_pem)
    permitted = [n.value for n in cert.extensions.get_extension_for_class(
        x509.NameConstraints).value.permitted_subtrees]
    assert "openai.azure.com" in permitted and "myres.openai.azure.com" not in permitted
    assert "amazonaws.com" not in permitted and "bedrock-runtime.us-east-1.amazonaws.com" in permitted


def test_uncovered_hosts_understands_wildcards(wild_ca, tmp_path):
    *_, cert_file = wild_ca
    assert uncovered_hosts(cert_file, (AZURE, "new.openai.azure.com", BEDROCK, VERTEX,
                                       "*.cognitiveservices.azure.com")) == [
        VERTEX, "*.cognitiveservices.azure.com"]
    _, narrow = create_ca(("myres.openai.azure.com",))
    (tmp_path / "narrow.pem").write_bytes(narrow)
    assert uncovered_hosts(tmp_path / "narrow.pem", (AZURE, "myres.openai.azure.com")) == [AZURE]


def test_the_redirect_resolves_concrete_names_and_warns_for_a_bare_wildcard(caplog):
    with caplog.at_level(logging.WARNING):
        names = redirect_names(hostpatterns.HostSet.of(["api.openai.com", AZURE, BEDROCK]), "targets")
    assert names[0] == "api.openai.com" and "bedrock-runtime.us-east-1.amazonaws.com" in names
    assert not any("*" in n for n in names)
    assert "*.openai.azure.com: no name under it is listed" in caplog.text
    caplog.clear()
    listed = hostpatterns.HostSet.of([AZURE, "myres.openai.azure.com"])
    with caplog.at_level(logging.WARNING):
        assert redirect_names(listed, "targets") == ("myres.openai.azure.com",)
        assert redirect_names(hostpatterns.HostSet.of([AZURE]), "all") == ()
    assert caplog.text == ""


def test_doctor_says_what_a_bare_wildcard_needs(tmp_path):
    d, _ = doctor(tmp_path, {})
    d.config = dataclasses.replace(d.config, targets=TargetsConfig(hosts=("api.anthropic.com", AZURE)))
    d.status = {**d.status, "targets": {"api.anthropic.com": ["10.0.0.2"]}}
    check = d.check_targets()
    assert check.status == "fail" and "*.openai.azure.com" in check.detail
    assert d.is_target("myres.openai.azure.com") and not d.is_target("openai.azure.com")
    d.status = {**d.status, "scope": "all"}
    assert d.check_targets().status == "ok"
    assert d.target_host() == "api.anthropic.com"


# --- secrets bound to a wildcard ---


def azure_flow(host: str, placeholder: str, path: str = "/openai/deployments/d/chat/completions"):
    return flow_to(host, path + "?api-version=2024-10-21", headers={"api-key": placeholder})


@pytest.fixture
def wild(tmp_path: Path):
    ph = write_secrets(tmp_path, ("azure", (AZURE,), "api-key", False, KEY),
                       ("mine", ("myres.openai.azure.com",), "api-key", False, KEY[::-1]))
    addon = Credentials()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, llmtap_state_dir=str(tmp_path))
        yield addon, ph


def test_a_wildcard_secret_is_injected_for_any_resource_under_it(wild):
    credentials, ph = wild
    for host in ("myres.openai.azure.com", "other.openai.azure.com"):
        flow = azure_flow(host, ph["azure"])
        credentials.requestheaders(flow)
        assert flow.response is None and flow.request.headers["api-key"] == KEY
        assert fields(flow)["credential"] == "azure"
        respond(credentials, flow)
        assert flow.request.headers["api-key"] == ph["azure"]


@pytest.mark.parametrize("host", [a for a in ATTACKS if a] + ["api.openai.com"])
def test_a_wildcard_secret_is_refused_anywhere_else(wild, host):
    credentials, ph = wild
    if host.isascii():
        flow = azure_flow(host, ph["azure"])
    else:  # not in a URL: as the TLS server name
        flow = azure_flow("myres.openai.azure.com", ph["azure"])
        flow.client_conn.sni = host
    credentials.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.request.headers["api-key"] == ph["azure"]


def test_a_concrete_binding_is_for_that_resource_only(wild):
    credentials, ph = wild
    flow = azure_flow("other.openai.azure.com", ph["mine"])
    credentials.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert "may only be sent to myres.openai.azure.com, not other.openai.azure.com" in fields(flow)["error"]


def sni_elsewhere(flow):
    flow.client_conn.sni = "evil.example"


def host_elsewhere(flow):
    flow.request.headers["host"] = "evil.example"
    flow.request.host = "evil.example"


def upstream_verified_elsewhere(flow):
    flow.server_conn.sni = "evil.example"


def plain(flow):
    flow.request.scheme = "http"
    flow.client_conn.tls = flow.server_conn.tls = False


@pytest.mark.parametrize("attack", [sni_elsewhere, host_elsewhere, upstream_verified_elsewhere, plain])
def test_a_wildcard_secret_needs_host_sni_and_verified_tls_all_under_it(wild, attack):
    credentials, ph = wild
    flow = azure_flow("myres.openai.azure.com", ph["azure"])
    attack(flow)
    credentials.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.request.headers["api-key"] == ph["azure"]


def test_when_absent_under_a_wildcard(tmp_path):
    write_secrets(tmp_path, ("azure", (AZURE,), "api-key", True, KEY))
    addon = Credentials(attribution=KnownUser("alice"))  # type: ignore[arg-type]
    with taddons.context(addon) as tctx:
        tctx.configure(addon, llmtap_state_dir=str(tmp_path))
        bare, elsewhere = flow_to("myres.openai.azure.com"), flow_to("api.openai.com")
        for flow in (bare, elsewhere):
            run_hook(addon.requestheaders(flow))
        assert bare.request.headers["api-key"] == KEY
        assert "api-key" not in elsewhere.request.headers and elsewhere.response is None


def test_secrets_take_a_wildcard_host_with_azures_header_and_variable():
    assert store.check_hosts(["*.OpenAI.azure.com."]) == (AZURE,)
    with pytest.raises(UsageError, match=r"--host '\*.com' needs at least two labels"):
        store.check_hosts(["*.com"])
    with pytest.raises(UsageError, match="--host 'not a host' is not a host name"):
        store.check_hosts(["not a host"])
    assert store.check_header(None, (AZURE,)) == "api-key"
    assert store.check_header(None, ("myres.openai.azure.com",)) == "api-key"
    secret = store.Secret(name="azure", id="x", hosts=(AZURE,), header="api-key", when_absent=False,
                          placeholder="p" * 32, created_at="", updated_at="")
    assert env_lines([secret], "sh") == [f"export AZURE_OPENAI_API_KEY='{'p' * 32}'"]
    bedrock = dataclasses.replace(secret, name="bedrock", hosts=(BEDROCK,))
    assert env_lines([bedrock], "sh") == [f"export AWS_BEARER_TOKEN_BEDROCK='{'p' * 32}'"]


def test_default_targets_are_unchanged():
    assert all("*" not in h for h in Config().targets.all_hosts)


def test_secrets_set_says_what_a_wildcard_target_needs(config, monkeypatch, capsys):
    config.write_text(config.read_text() + f'[targets]\nextra_hosts = ["{AZURE}"]\n')

    def run(*argv: str) -> tuple[int, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(KEY))
        try:
            code = cli.main([*argv, "--config", str(config)])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        return code, capsys.readouterr().err

    code, err = run("secrets", "set", "wild", "--host", AZURE)
    assert code == 0 and "warning" not in err
    code, err = run("secrets", "set", "mine", "--host", "myres.openai.azure.com")
    assert code == 0 and "only under a wildcard target: list it in targets.extra_hosts" in err
    code, err = run("secrets", "set", "deep", "--host", "*.services.ai.azure.com")
    assert code == 0 and "*.services.ai.azure.com is not a target" in err
    code, err = run("secrets", "set", "broad", "--host", "*.com")
    assert code == 2 and "--host '*.com' needs at least two labels" in err
    [mine] = [s for s in store.read_store(store.StorePaths.under(config.parent / "state"))
              if s.name == "mine"]
    assert mine.header == "api-key"
