"""macOS trust store: the exact `security` commands, on a real certificate."""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.macos import trust
from llmtap.platform.macos.trust import KeychainTrustStore
from llmtap.platform.runner import Completed

SECURITY = "/usr/bin/security"
KEYCHAIN = "/Library/Keychains/System.keychain"
FIND = (SECURITY, "find-certificate", "-a", "-c", "llmtap local CA", "-Z", "-p", KEYCHAIN)


def make_ca(serial: int) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmtap local CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(serial)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.PEM)


def sha1(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    return hashlib.sha1(der).hexdigest().upper()


def found_output(*pems: bytes) -> str:
    """What `security find-certificate -a -Z -p` prints for each match."""
    blocks = []
    for pem in pems:
        sha256 = hashlib.sha256(pem).hexdigest().upper()
        blocks.append(f"SHA-256 hash: {sha256}\nSHA-1 hash: {sha1(pem)}\n{pem.decode()}")
    return "".join(blocks)


class FakeRunner:
    def __init__(self) -> None:
        self.answers: dict[tuple[str, ...], Completed] = {}
        self.calls: list[list[str]] = []
        self.files: dict[str, str] = {}  # contents of the files named in commands, when run

    def __call__(self, argv: list[str], stdin: str | None = None) -> Completed:
        self.calls.append(argv)
        if argv[1] == "remove-trusted-cert":
            self.files[argv[-1]] = Path(argv[-1]).read_text()
        return self.answers.get(tuple(argv), Completed(0))


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    path = tmp_path / "llmtap-ca.pem"
    path.write_bytes(make_ca(1))
    return path


def test_trust_command(ca: Path) -> None:
    runner = FakeRunner()
    KeychainTrustStore(runner).trust(ca)
    assert runner.calls == [[SECURITY, "add-trusted-cert", "-d", "-r", "trustRoot", "-k", KEYCHAIN,
                             str(ca)]]


def test_trust_without_root_is_a_usage_error(ca: Path) -> None:
    runner = FakeRunner()
    runner.answers[tuple(trust.trust_command(ca))] = Completed(
        1, "", "SecTrustSettingsSetTrustSettings: The authorization was denied since no user "
        "interaction was possible.\n")
    with pytest.raises(UsageError, match="needs root"):
        KeychainTrustStore(runner).trust(ca)


def test_untrust_removes_every_llmtap_ca_and_its_trust_setting(ca: Path) -> None:
    older = make_ca(2)
    runner = FakeRunner()
    runner.answers[FIND] = Completed(0, found_output(ca.read_bytes(), older))
    KeychainTrustStore(runner).untrust()
    assert runner.calls[0] == list(FIND)
    removes = [c for c in runner.calls if c[1] == "remove-trusted-cert"]
    deletes = [c for c in runner.calls if c[1] == "delete-certificate"]
    assert [c[:3] for c in removes] == [[SECURITY, "remove-trusted-cert", "-d"]] * 2
    assert deletes == [
        [SECURITY, "delete-certificate", "-Z", sha1(ca.read_bytes()), KEYCHAIN],
        [SECURITY, "delete-certificate", "-Z", sha1(older), KEYCHAIN],
    ]
    handed = [runner.files[c[-1]].strip() for c in removes]
    assert handed == [ca.read_text().strip(), older.decode().strip()]
    assert all(not Path(c[-1]).exists() for c in removes)  # temporary files are gone


def test_untrust_with_nothing_there(ca: Path) -> None:
    runner = FakeRunner()
    runner.answers[FIND] = Completed(44, "", "security: SecKeychainSearchCopyNext: The specified "
                                     "item could not be found in the keychain.")
    KeychainTrustStore(runner).untrust()
    assert runner.calls == [list(FIND)]


def test_failed_delete_is_one_line(ca: Path) -> None:
    runner = FakeRunner()
    runner.answers[FIND] = Completed(0, found_output(ca.read_bytes()))
    runner.answers[(SECURITY, "delete-certificate", "-Z", sha1(ca.read_bytes()), KEYCHAIN)] = \
        Completed(1, "", "Unable to delete certificate matching \"x\"\n")
    with pytest.raises(RuntimeFailure, match=r'^security delete-certificate failed: Unable'):
        KeychainTrustStore(runner).untrust()


def test_is_trusted_needs_the_keychain_item_and_a_verified_trust(ca: Path) -> None:
    runner = FakeRunner()
    runner.answers[FIND] = Completed(0, found_output(make_ca(3)))
    assert KeychainTrustStore(runner).is_trusted(ca) is False
    assert runner.calls == [list(FIND)]  # another llmtap CA: no need to verify
    runner.answers[FIND] = Completed(0, found_output(ca.read_bytes()))
    assert KeychainTrustStore(runner).is_trusted(ca) is True
    assert runner.calls[-1] == [SECURITY, "verify-cert", "-c", str(ca), "-l", "-L"]
    runner.answers[tuple(trust.verify_command(ca))] = Completed(
        1, "", "Cert Verify Result: CSSMERR_TP_NOT_TRUSTED")
    assert KeychainTrustStore(runner).is_trusted(ca) is False


def test_fingerprint_matches_cryptography(ca: Path) -> None:
    cert = x509.load_pem_x509_certificate(ca.read_bytes())
    assert trust.sha1_fingerprint(ca) == cert.fingerprint(hashes.SHA1()).hex().upper()
