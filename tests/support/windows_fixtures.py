"""The saved Windows tool outputs (tests/fixtures/windows, sources in SOURCES.md), read as the
runner would hand them over, and filled in with what the fake machine holds."""

from __future__ import annotations

from pathlib import Path

import paths
from cryptography import x509
from llmtap.platform.runner import Completed
from llmtap.platform.windows.trust import thumbprint

FIXTURES = paths.FIXTURES / "windows"


def fixture(name: str) -> str:
    """Text as Python reads a console's output (CRLF become LF, as in text mode)."""
    return (FIXTURES / name).read_bytes().decode().replace("\r\n", "\n")


def certutil_listing(cert: Path, spaced: bool = False) -> str:
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    sha1 = thumbprint(cert)
    if spaced:  # older certutil: "32 c6 b7 ..."
        sha1 = " ".join(sha1[i:i + 2] for i in range(0, len(sha1), 2))
    subject = ", ".join(reversed([a.rfc4514_string() for a in parsed.subject]))
    return fixture("certutil_store_root_llmtap.txt").format(
        serial=format(parsed.serial_number, "x"), subject=subject, sha1=sha1,
        not_before=parsed.not_valid_before_utc.strftime("%m/%d/%Y %I:%M %p"),
        not_after=parsed.not_valid_after_utc.strftime("%m/%d/%Y %I:%M %p"))


class FakeNetsh:
    """`netsh advfirewall firewall` with one rule table, answering in the saved formats."""

    def __init__(self) -> None:
        self.rules: dict[str, dict[str, str]] = {}

    def __call__(self, argv: list[str]) -> Completed:
        verb, options = argv[3], dict(a.split("=", 1) for a in argv[5:] if "=" in a)
        name = options["name"]
        if verb == "add":
            self.rules[name] = options
            return Completed(0, "Ok.\n\n")
        if name not in self.rules:
            return Completed(1, fixture("netsh_show_rule_missing.txt"))
        if verb == "delete":
            del self.rules[name]
            return Completed(0, "\nDeleted 1 rule(s).\nOk.\n\n")
        return Completed(0, fixture("netsh_show_rule.txt").replace(
            "8443", self.rules[name]["localport"]))
