"""macOS trust: the CA as an admin-trusted root in the System keychain (`security`)."""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.base import TrustStore
from llmtap.platform.runner import Runner, SubprocessRunner

SECURITY = "/usr/bin/security"
SYSTEM_KEYCHAIN = "/Library/Keychains/System.keychain"
COMMON_NAME = "llmtap local CA"  # llmtap.ca.create_ca's subject

PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
SHA1_LINE = re.compile(r"^SHA-1 hash:\s*([0-9A-Fa-f]{40})\s*$", re.MULTILINE)


def sha1_fingerprint(pem_or_path: Path | str) -> str:
    """The upper-case SHA-1 of the certificate's DER, as `security` prints it."""
    pem = pem_or_path.read_bytes() if isinstance(pem_or_path, Path) else pem_or_path.encode()
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    return hashlib.sha1(der).hexdigest().upper()


def parse_found(output: str) -> list[tuple[str, str]]:
    """(SHA-1, PEM) pairs from `security find-certificate -a -Z -p`, in order."""
    return list(zip(SHA1_LINE.findall(output), PEM_BLOCK.findall(output), strict=False))


def trust_command(ca_cert: Path) -> list[str]:
    return [SECURITY, "add-trusted-cert", "-d", "-r", "trustRoot", "-k", SYSTEM_KEYCHAIN,
            str(ca_cert)]


def find_command(common_name: str = COMMON_NAME) -> list[str]:
    return [SECURITY, "find-certificate", "-a", "-c", common_name, "-Z", "-p", SYSTEM_KEYCHAIN]


def untrust_commands(sha1: str, pem_file: Path) -> list[list[str]]:
    """Trust settings first (they live apart from the keychain item), then the certificate."""
    return [
        [SECURITY, "remove-trusted-cert", "-d", str(pem_file)],
        [SECURITY, "delete-certificate", "-Z", sha1, SYSTEM_KEYCHAIN],
    ]


def verify_command(ca_cert: Path) -> list[str]:
    # -l: the "leaf" is a CA; -L: local certificates only (no network fetch).
    return [SECURITY, "verify-cert", "-c", str(ca_cert), "-l", "-L"]


class KeychainTrustStore(TrustStore):
    name = "keychain"

    def __init__(self, runner: Runner | None = None, common_name: str = COMMON_NAME) -> None:
        self.runner = runner or SubprocessRunner()
        self.common_name = common_name

    @classmethod
    def available(cls) -> bool:
        return sys.platform == "darwin" and os.path.exists(SECURITY)

    def trust(self, ca_cert: Path) -> None:
        result = self.runner(trust_command(ca_cert))
        if not result.ok:
            reason = result.reason()
            if "authorization" in reason.lower() or "not permitted" in reason.lower():
                raise UsageError(f"trusting the CA needs root: run it with sudo ({reason})")
            raise RuntimeFailure(f"security add-trusted-cert failed: {reason}")

    def untrust(self) -> None:
        """Removes every llmtap CA (also older ones after a rotation) and its trust setting."""
        with tempfile.TemporaryDirectory(prefix="llmtap-untrust-") as tmp:
            for index, (sha1, pem) in enumerate(self._found()):
                pem_file = Path(tmp) / f"ca-{index}.pem"
                pem_file.write_text(pem + "\n")
                remove_trust, delete = untrust_commands(sha1, pem_file)
                self.runner(remove_trust)  # absent trust setting: nothing to undo
                result = self.runner(delete)
                if not result.ok:
                    raise RuntimeFailure(f"security delete-certificate failed: {result.reason()}")

    def is_trusted(self, ca_cert: Path) -> bool:
        if sha1_fingerprint(ca_cert) not in {sha1 for sha1, _ in self._found()}:
            return False
        return self.runner(verify_command(ca_cert)).ok

    def found(self) -> list[tuple[str, str]]:
        """(SHA-1, PEM) of every llmtap CA in the System keychain."""
        return self._found()

    def _found(self) -> list[tuple[str, str]]:
        result = self.runner(find_command(self.common_name))
        return parse_found(result.stdout) if result.ok else []
