"""Windows trust: the CA in the machine's Trusted Root store (`certutil -addstore Root`)."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from llmtap.errors import RuntimeFailure
from llmtap.platform.base import TrustStore
from llmtap.platform.runner import Runner, SubprocessRunner
from llmtap.platform.windows.elevation import ElevationCheck, is_elevated, require_elevated

CERTUTIL = "certutil"
STORE = "Root"  # LocalMachine\Root: every user and service on the machine
COMMON_NAME = "llmtap local CA"  # llmtap.ca.create_ca's subject


def thumbprint(ca_cert: Path) -> str:
    """The certificate's SHA-1, the id certutil (and the store) know it by."""
    der = x509.load_pem_x509_certificate(ca_cert.read_bytes()).public_bytes(Encoding.DER)
    return hashlib.sha1(der).hexdigest()


def trust_command(ca_cert: Path) -> list[str]:
    # -f: replace an existing copy instead of failing; certutil reads PEM and DER alike.
    return [CERTUTIL, "-addstore", "-f", STORE, str(ca_cert)]


def untrust_command(common_name: str = COMMON_NAME) -> list[str]:
    """By subject name: also removes llmtap CAs of earlier installs (after a rotation)."""
    return [CERTUTIL, "-delstore", STORE, common_name]


def query_command(ca_cert: Path) -> list[str]:
    return [CERTUTIL, "-store", STORE, thumbprint(ca_cert)]


def listed_hashes(output: str) -> list[str]:
    """The "Cert Hash(sha1):" of each certificate `certutil -store` lists (older certutil
    prints the bytes space-separated), lower-case hex."""
    return [line.split(":", 1)[1].replace(" ", "").strip().lower()
            for line in output.splitlines() if line.startswith("Cert Hash(sha1):")]


class CertutilTrustStore(TrustStore):
    name = "certutil"

    def __init__(
        self, runner: Runner | None = None, elevated: ElevationCheck = is_elevated,
        common_name: str = COMMON_NAME,
    ) -> None:
        self.runner = runner or SubprocessRunner()
        self.elevated = elevated
        self.common_name = common_name

    @classmethod
    def available(cls) -> bool:
        return sys.platform == "win32" and shutil.which(CERTUTIL) is not None

    def trust(self, ca_cert: Path) -> None:
        require_elevated("trusting the CA", self.elevated)
        result = self.runner(trust_command(ca_cert))
        if not result.ok:
            raise RuntimeFailure(f"certutil -addstore failed: {result.reason()}")

    def untrust(self) -> None:
        require_elevated("untrusting the CA", self.elevated)
        if self._present():
            result = self.runner(untrust_command(self.common_name))
            if not result.ok:
                raise RuntimeFailure(f"certutil -delstore failed: {result.reason()}")

    def is_trusted(self, ca_cert: Path) -> bool:
        """The store lists a certificate with exactly this one's SHA-1."""
        result = self.runner(query_command(ca_cert))
        return result.ok and thumbprint(ca_cert) in listed_hashes(result.stdout)

    def present(self) -> bool:
        """Whether any llmtap CA (this one or one before a rotation) is in the Root store."""
        return self._present()

    def _present(self) -> bool:
        return self.runner([CERTUTIL, "-store", STORE, self.common_name]).ok
