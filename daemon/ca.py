"""llmtap's certificate authority, name-constrained to the target hosts, and the upstream bundle.

The CA may only vouch for the targets (X.509 permitted DNS subtrees) and never for an IP address
(excluded 0.0.0.0/0 and ::/0), so even a stolen key cannot impersonate any other site. A wildcard
target `*.openai.azure.com` permits the subtree `openai.azure.com` (RFC 5280: the name and every
name under it; the leading-dot form is not understood by every client); a region pattern permits
each of its concrete names. mitmproxy
reads it from its confdir as `mitmproxy-ca.pem` (key and certificate together).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from llmtap import hostpatterns
from llmtap.atomic import write_atomic
from llmtap.errors import RuntimeFailure

MITM_BASENAME = "mitmproxy"
KEY_AND_CERT = f"{MITM_BASENAME}-ca.pem"  # what mitmproxy loads: private key + certificate
PUBLIC_CERT = "llmtap-ca.pem"  # what users and trust stores get: the certificate alone
CA_VALIDITY = datetime.timedelta(days=3650)

# Where the OS keeps its roots, per distribution (the first that exists wins).
SYSTEM_ROOT_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Arch, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # macOS, BSDs
)


def public_cert_path(ca_dir: Path) -> Path:
    return ca_dir / PUBLIC_CERT


def create_ca(hosts: tuple[str, ...], common_name: str = "llmtap local CA") -> tuple[bytes, bytes]:
    """A new CA: (PEM private key, PEM certificate)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llmtap"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(h) for h in hostpatterns.HostSet.of(hosts).subtrees],
        excluded_subtrees=[
            x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
            x509.IPAddress(ipaddress.ip_network("::/0")),
        ],
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(constraints, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def ensure_ca(ca_dir: Path, hosts: tuple[str, ...], uid: int, gid: int) -> Path:
    """Creates the CA once; the key is readable by the service user only. Returns the cert path."""
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _own_dir(ca_dir, uid, gid)
    key_file = ca_dir / KEY_AND_CERT
    cert_file = public_cert_path(ca_dir)
    if not key_file.exists():
        key_pem, cert_pem = create_ca(hosts)
        write_file(key_file, key_pem + cert_pem, 0o600, uid, gid)
        write_file(cert_file, cert_pem, 0o644, uid, gid)
    return cert_file


def uncovered_hosts(cert_file: Path, hosts: tuple[str, ...]) -> list[str]:
    """Targets the existing CA may not vouch for (added after it was made): `llmtap ca rotate`."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    try:
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return []
    permitted = [str(n.value) for n in constraints.permitted_subtrees or [] if isinstance(n, x509.DNSName)]
    return [p.text for p in hostpatterns.HostSet.of(hosts).patterns if not _covered(p, permitted)]


def _covered(pattern: hostpatterns.HostPattern, permitted: list[str]) -> bool:
    """Every name `pattern` stands for is under a permitted subtree (a leftmost wildcard's
    names are under its domain: that domain, or a parent of it, must be permitted)."""
    names = (pattern.subtree,) if pattern.subtree else pattern.names
    return all(any(hostpatterns.within(n, p) for p in permitted) for n in names)


def root_bundle_candidates(platform: str | None = None) -> list[str]:
    """The PEM files that may hold the OS's roots, in order; certifi's bundle last.

    Windows keeps its roots in the certificate store, not in a file (and fetches most of them
    only when first needed, so an export would be incomplete): certifi's bundle it is. The POSIX
    paths are never tried there: "/etc/ssl/cert.pem" would mean C:\\etc\\ssl, which any user may
    create.
    """
    import certifi  # mitmproxy depends on it

    if (platform or sys.platform) == "win32":
        return [certifi.where()]
    return [*SYSTEM_ROOT_BUNDLES, ssl.get_default_verify_paths().cafile or "", certifi.where()]


def system_roots(platform: str | None = None) -> bytes:
    """The OS's trusted roots as PEM (certifi's bundle when the OS has none)."""
    for candidate in root_bundle_candidates(platform):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_bytes()
    raise RuntimeFailure("no trusted root certificates found (is certifi installed?)")


def write_upstream_bundle(dest: Path, extra_ca: str, uid: int, gid: int) -> Path:
    """System roots plus `upstream.extra_ca`, in a file the unprivileged worker can read."""
    bundle = system_roots()
    if extra_ca:
        try:
            extra = Path(extra_ca).read_bytes()
        except OSError as exc:
            raise RuntimeFailure(f"cannot read upstream.extra_ca {extra_ca}: {exc.strerror}") from None
        bundle = bundle.rstrip(b"\n") + b"\n" + extra
    write_file(dest, bundle, 0o644, uid, gid)
    return dest


def _own_dir(path: Path, uid: int, gid: int) -> None:
    """The service user owns the state directory, so `ca` may be its symlink (to /etc): root
    opens the directory without following one and changes it through the descriptor."""
    if not hasattr(os, "fchown"):  # Windows: the state directory's ACL protects it (inprocess.py)
        os.chmod(path, 0o700)
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise RuntimeFailure(f"{path} is not a directory (a symbolic link?): {exc.strerror}") from None
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
    """Atomically replaces `path` with `data`, owned uid:gid with `mode` (POSIX)."""
    write_atomic(path, data, mode, (uid, gid))
