"""What the runtimes that ignore the OS trust store are told: the variables, their files, and the
CA bundle they point at. The same on every OS; only where the variables are set differs."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from cryptography import x509
from llmtap.platform.linux.trust import PEM_BLOCK

LLMTAP_CA_CN = b"llmtap local CA"

# Runtimes that do not read the OS store, and the file each one is given (see env_values).
ENV_FOR_CERT = ("NODE_EXTRA_CA_CERTS",)  # Node, Claude Code: added to Node's own roots
ENV_FOR_BUNDLE = (
    "SSL_CERT_FILE",  # OpenSSL tools, Python httpx and the anthropic/openai SDKs, Go, Rust
    "REQUESTS_CA_BUNDLE",  # Python requests (and pip)
    "CURL_CA_BUNDLE",  # curl builds that do not use the OS store
    "CODEX_CA_CERTIFICATE",  # the Codex CLI (it takes precedence over SSL_CERT_FILE)
)

QUOTE, ESCAPED_QUOTE = "'", "'\\''"  # a ' inside a single-quoted sh word
ENV_HEADER = ("Written by `sudo llmtap install`, removed by `sudo llmtap uninstall`: do not edit.\n"
              "Runtimes that do not read the OS trust store learn llmtap's CA from these.")


def env_values(cert: Path, bundle: Path) -> dict[str, str]:
    values = dict.fromkeys(ENV_FOR_CERT, str(cert))
    values.update(dict.fromkeys(ENV_FOR_BUNDLE, str(bundle)))
    return values


def profile_script(values: dict[str, str]) -> str:
    lines = [f"# {line}" for line in ENV_HEADER.splitlines()]
    lines += [f"export {name}='{value.replace(QUOTE, ESCAPED_QUOTE)}'" for name, value in values.items()]
    return "\n".join(lines) + "\n"


def environment_d(values: dict[str, str]) -> str:
    lines = [f"# {line}" for line in ENV_HEADER.splitlines()]
    lines += [f"{name}={value}" for name, value in values.items()]
    return "\n".join(lines) + "\n"


def parse_profile_script(text: str) -> dict[str, str]:
    """The variables of our profile script (what a new login shell gets)."""
    values = {}
    for line in text.splitlines():
        match = re.match(r"^export ([A-Z_]+)='(.*)'$", line.strip())
        if match:
            values[match.group(1)] = match.group(2).replace(ESCAPED_QUOTE, QUOTE)
    return values


def ca_bundle(system_roots: bytes, cert_pem: bytes) -> bytes:
    """The system roots without any llmtap CA (the OS store may hold ours already), plus ours."""
    kept = []
    for block in PEM_BLOCK.findall(system_roots):
        try:
            with warnings.catch_warnings():  # some distribution roots have odd serial numbers
                warnings.simplefilter("ignore")
                subject = x509.load_pem_x509_certificate(block).subject.rfc4514_string().encode()
        except ValueError:
            continue
        if LLMTAP_CA_CN not in subject:
            kept.append(block)
    return b"\n".join(kept) + (b"\n" if kept else b"") + cert_pem
