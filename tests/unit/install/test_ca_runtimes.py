"""The name-constrained CA as real runtimes see it: curl, Python and Node accept a leaf it signs for
a target and reject one it signs for any other name (or one carrying an IP address), whoever holds
the key. A TLS server on loopback picks the leaf by SNI; clients reach it with --resolve / an
explicit address, so no name is ever looked up.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from llmtap.ca import create_ca
from tls_bed import SniServer, issue

TARGET = "api.anthropic.com"
SUBDOMAIN = "eu.api.anthropic.com"  # covered: inside the permitted subtree
OTHER = "www.example.com"
WITH_IP = "api.openai.com"  # a target, but its leaf also names an IP address (excluded subtree)
NODE = shutil.which("node")
WILDCARD = "*.openai.azure.com"  # a target: the CA permits the subtree openai.azure.com
UNDER_WILDCARD = "myres.openai.azure.com"
LOOKALIKE = "myres.openai.azure.com.evil.example"


@pytest.fixture(scope="module")
def bed(tmp_path_factory) -> Iterator[tuple[SniServer, Path]]:
    directory = tmp_path_factory.mktemp("nc-ca")
    ca_key, ca_cert = create_ca((TARGET, WITH_IP, WILDCARD))
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca_cert)
    names: dict[str, list[x509.GeneralName]] = {
        TARGET: [x509.DNSName(TARGET)],
        SUBDOMAIN: [x509.DNSName(SUBDOMAIN)],
        OTHER: [x509.DNSName(OTHER)],
        UNDER_WILDCARD: [x509.DNSName(UNDER_WILDCARD)],
        LOOKALIKE: [x509.DNSName(LOOKALIKE)],
        WITH_IP: [x509.DNSName(WITH_IP), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    }
    leaves = {}
    for name, sans in names.items():
        key_pem, cert_pem = issue(ca_key, ca_cert, sans)
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        leaves[name] = (cert, key)
    server = SniServer(leaves)
    yield server, ca_file
    server.close()


def curl(bed: tuple[SniServer, Path], host: str) -> subprocess.CompletedProcess[str]:
    server, ca_file = bed
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--noproxy", "*", "--cacert", str(ca_file),
         "--resolve", f"{host}:{server.port}:127.0.0.1", f"https://{host}:{server.port}/"],
        capture_output=True, text=True)


def python_handshake(bed: tuple[SniServer, Path], host: str) -> str:
    server, ca_file = bed
    ctx = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=host):
            return "ok"
    except ssl.SSLCertVerificationError as exc:
        return exc.verify_message


NODE_CLIENT = """
const tls = require("tls"), fs = require("fs");
const [port, host, ca] = process.argv.slice(1);
const s = tls.connect({host: "127.0.0.1", port: +port, servername: host, ca: fs.readFileSync(ca)},
  () => { console.log(JSON.stringify({ok: s.authorized})); s.end(); });
s.on("error", (e) => console.log(JSON.stringify({ok: false, code: e.code, message: e.message})));
"""


def node_handshake(bed: tuple[SniServer, Path], host: str) -> dict[str, object]:
    server, ca_file = bed
    result = subprocess.run([NODE or "node", "-e", NODE_CLIENT, str(server.port), host, str(ca_file)],
                            capture_output=True, text=True, timeout=30)
    answer: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_curl_accepts_targets_and_rejects_other_names(bed):
    for host in (TARGET, SUBDOMAIN):
        result = curl(bed, host)
        assert (result.returncode, result.stdout) == (0, "ok"), result.stderr
    for host, reason in ((OTHER, "permitted subtree violation"),
                         (WITH_IP, "excluded subtree violation")):
        result = curl(bed, host)
        assert result.returncode == 60 and reason in result.stderr, result.stderr


def test_python_accepts_targets_and_rejects_other_names(bed):
    assert python_handshake(bed, TARGET) == "ok"
    assert python_handshake(bed, SUBDOMAIN) == "ok"
    assert python_handshake(bed, OTHER) == "permitted subtree violation"
    assert python_handshake(bed, WITH_IP) == "excluded subtree violation"


def test_httpx_accepts_a_target_and_rejects_another_name(bed):
    httpx = pytest.importorskip("httpx")
    server, ca_file = bed
    # httpx cannot be told an address for a name: connect to 127.0.0.1 and name the host in SNI.
    transport = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(ca_file)))
    with httpx.Client(transport=transport, trust_env=False) as client:
        response = client.get(f"https://127.0.0.1:{server.port}/",
                              extensions={"sni_hostname": TARGET})
        assert response.text == "ok"
        with pytest.raises(httpx.ConnectError, match="permitted subtree violation"):
            client.get(f"https://127.0.0.1:{server.port}/", extensions={"sni_hostname": OTHER})


@pytest.mark.skipif(NODE is None, reason="needs Node (apt-get install nodejs)")
def test_node_accepts_targets_and_rejects_other_names(bed):
    assert node_handshake(bed, TARGET) == {"ok": True}
    assert node_handshake(bed, SUBDOMAIN) == {"ok": True}
    # Node maps these OpenSSL errors to code "UNSPECIFIED"; the message is OpenSSL's own.
    other = node_handshake(bed, OTHER)
    assert other["ok"] is False and other["message"] == "permitted subtree violation", other
    with_ip = node_handshake(bed, WITH_IP)
    assert with_ip["ok"] is False and with_ip["message"] == "excluded subtree violation", with_ip


def test_every_runtime_accepts_a_name_under_a_wildcard_target_and_no_look_alike(bed):
    assert python_handshake(bed, UNDER_WILDCARD) == "ok"
    assert python_handshake(bed, LOOKALIKE) == "permitted subtree violation"
    if shutil.which("curl"):
        assert curl(bed, UNDER_WILDCARD).returncode == 0
        assert "permitted subtree violation" in curl(bed, LOOKALIKE).stderr
    if NODE:
        assert node_handshake(bed, UNDER_WILDCARD) == {"ok": True}
        assert node_handshake(bed, LOOKALIKE)["message"] == "permitted subtree violation"
