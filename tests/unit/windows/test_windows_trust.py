"""Windows trust store: the exact certutil commands, and clear errors when not elevated."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.runner import Completed
from llmtap.platform.windows import trust
from llmtap.platform.windows.trust import CertutilTrustStore
from windows_fixtures import certutil_listing, fixture


class FakeRunner:
    def __init__(self) -> None:
        self.answers: dict[tuple[str, ...], Completed] = {}
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], stdin: str | None = None) -> Completed:
        self.calls.append(argv)
        return self.answers.get(tuple(argv), Completed(0))


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmtap local CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "llmtap-ca.pem"
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    return path


def store(runner: FakeRunner, elevated: bool = True) -> CertutilTrustStore:
    return CertutilTrustStore(runner, elevated=lambda: elevated)


def test_trust(ca: Path) -> None:
    runner = FakeRunner()
    store(runner).trust(ca)
    assert runner.calls == [["certutil", "-addstore", "-f", "Root", str(ca)]]


def test_untrust_by_name_only_when_present(ca: Path) -> None:
    runner = FakeRunner()
    store(runner).untrust()
    assert runner.calls == [["certutil", "-store", "Root", "llmtap local CA"],
                            ["certutil", "-delstore", "Root", "llmtap local CA"]]
    runner = FakeRunner()
    runner.answers[("certutil", "-store", "Root", "llmtap local CA")] = Completed(
        0x80092004, "", "CertUtil: -store command FAILED: 0x80092004 (-2146885628 "
        "CRYPT_E_NOT_FOUND)\nCertUtil: Cannot find object or property.\n")
    store(runner).untrust()
    assert runner.calls == [["certutil", "-store", "Root", "llmtap local CA"]]


@pytest.mark.parametrize("spaced", [False, True], ids=["certutil-10", "certutil-older"])
def test_is_trusted_asks_by_thumbprint_and_reads_the_listing(ca: Path, spaced: bool) -> None:
    runner = FakeRunner()
    cert = x509.load_pem_x509_certificate(ca.read_bytes())
    query = ("certutil", "-store", "Root", cert.fingerprint(hashes.SHA1()).hex())
    runner.answers[query] = Completed(0, certutil_listing(ca, spaced))
    assert store(runner, elevated=False).is_trusted(ca) is True  # reading needs no elevation
    assert runner.calls == [list(query)]
    runner.answers[query] = Completed(1, fixture("certutil_store_not_found.txt"))
    assert store(runner).is_trusted(ca) is False
    runner.answers[query] = Completed(0, "CertUtil: -store command completed successfully.\n")
    assert store(runner).is_trusted(ca) is False  # success, but this certificate is not listed


@pytest.mark.parametrize("action", ["trust", "untrust"])
def test_not_elevated_is_a_clear_error(ca: Path, action: str) -> None:
    runner = FakeRunner()
    with pytest.raises(UsageError) as caught:
        if action == "trust":
            store(runner, elevated=False).trust(ca)
        else:
            store(runner, elevated=False).untrust()
    assert "Administrator" in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.exit_code == 2
    assert runner.calls == []


def test_certutil_failure_is_one_line(ca: Path) -> None:
    runner = FakeRunner()
    runner.answers[tuple(trust.trust_command(ca))] = Completed(
        1, "Root \"Trusted Root Certification Authorities\"\n",
        "CertUtil: -addstore command FAILED: 0x80070005 (WIN32: 5 ERROR_ACCESS_DENIED)\n"
        "CertUtil: Access is denied.\n")
    with pytest.raises(RuntimeFailure) as caught:
        store(runner).trust(ca)
    assert str(caught.value) == (
        "certutil -addstore failed: CertUtil: -addstore command FAILED: 0x80070005 "
        "(WIN32: 5 ERROR_ACCESS_DENIED)"
    )
