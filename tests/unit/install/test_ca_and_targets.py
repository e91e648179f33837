"""The name-constrained CA, the leaves mitmproxy forges with it, and target resolution."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from llmtap.ca import KEY_AND_CERT, create_ca, ensure_ca, uncovered_hosts
from llmtap.targets import Lookup, TargetResolver, split_families
from mitmproxy.certs import CertStore

HOSTS = ("api.anthropic.com", "api.openai.com")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ca")
    key_pem, cert_pem = create_ca(HOSTS)
    (directory / KEY_AND_CERT).write_bytes(key_pem + cert_pem)
    return CertStore.from_store(directory, "mitmproxy", 2048), cert_pem


def verify(cert_pem: bytes, leaf: x509.Certificate, name: str) -> None:
    ca = x509.load_pem_x509_certificate(cert_pem)
    verifier = (PolicyBuilder().store(Store([ca]))
                .time(datetime.datetime.now(datetime.UTC)).build_server_verifier(
                    x509.DNSName(name)))
    verifier.verify(leaf, [])


def test_leaf_with_only_the_target_name_is_valid(store):
    certstore, cert_pem = store
    entry = certstore.get_cert("api.anthropic.com", [x509.DNSName("api.anthropic.com")])
    verify(cert_pem, entry.cert._cert, "api.anthropic.com")


def test_ca_cannot_vouch_for_other_names_or_ip_addresses(store):
    certstore, cert_pem = store
    other = certstore.get_cert("example.com", [x509.DNSName("example.com")])
    with pytest.raises(VerificationError):
        verify(cert_pem, other.cert._cert, "example.com")
    # What mitmproxy's stock get_cert would forge in transparent mode: the name plus the IP.
    with_ip = certstore.get_cert("api.openai.com", [
        x509.DNSName("api.openai.com"), x509.IPAddress(ipaddress.ip_address("10.0.0.2"))])
    with pytest.raises(VerificationError):
        verify(cert_pem, with_ip.cert._cert, "api.openai.com")


def test_ensure_ca_is_private_and_created_once(tmp_path):
    import os

    cert = ensure_ca(tmp_path / "ca", HOSTS, os.getuid(), os.getgid())
    key_file = tmp_path / "ca" / KEY_AND_CERT
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert b"PRIVATE KEY" not in cert.read_bytes()
    before = key_file.read_bytes()
    ensure_ca(tmp_path / "ca", HOSTS, os.getuid(), os.getgid())
    assert key_file.read_bytes() == before
    assert uncovered_hosts(cert, (*HOSTS, "sub.api.openai.com", "api.x.ai")) == ["api.x.ai"]


def test_resolver_keeps_vanished_addresses_for_the_grace_period():
    now = [0.0]
    answers = {"a.example.com": Lookup(frozenset({"1.1.1.1", "fd00::1"}), 600)}
    resolver = TargetResolver(["a.example.com"], grace_s=100, refresh_max_s=300,
                              lookup=lambda h: answers[h], clock=lambda: now[0])
    addresses, next_in = resolver.refresh()
    assert addresses.v4 == {"1.1.1.1"} and addresses.v6 == {"fd00::1"}
    assert next_in == 300  # the TTL is longer than the ceiling
    answers["a.example.com"] = Lookup(frozenset({"2.2.2.2"}), 5)
    now[0] = 50
    addresses, next_in = resolver.refresh()
    assert addresses.v4 == {"1.1.1.1", "2.2.2.2"} and next_in == 30  # floor for tiny TTLs
    now[0] = 151
    addresses, _ = resolver.refresh()
    assert addresses.v4 == {"2.2.2.2"} and addresses.v6 == frozenset()


def test_split_families_unmaps_ipv4_in_ipv6():
    assert split_families(["::ffff:1.2.3.4", "fd00::5"]).v4 == {"1.2.3.4"}
