"""Linux trust: the distribution's CA store, chosen by /etc/os-release, and users' NSS databases.

Debian/Ubuntu: /usr/local/share/ca-certificates + update-ca-certificates. Fedora/RHEL:
/etc/pki/ca-trust/source/anchors + update-ca-trust. Arch: p11-kit's `trust anchor`. Chrome and
Firefox keep their own NSS databases; those of local users get the CA too when certutil exists.

Every path is taken under `root` so tests work in a temporary tree; with a root other than "/"
update-ca-certificates is pointed at that tree too, so it never touches the host's store.
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from llmtap.atomic import write_atomic
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.base import TrustStore
from llmtap.platform.runner import Runner, SubprocessRunner

COMMON_NAME = "llmtap local CA"  # llmtap.ca.create_ca's subject, the nickname in NSS databases
ANCHOR_NAME = "llmtap"

Which = Callable[[str], str | None]

PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def under(root: Path, path: Path | str) -> Path:
    """`path` (absolute, as the installed system sees it) inside the tree at `root`."""
    path = Path(path)
    return path if root == Path("/") else root / path.relative_to("/")


def der_of(pem: bytes) -> bytes:
    with warnings.catch_warnings():  # some distribution roots have odd serial numbers
        warnings.simplefilter("ignore")
        return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def bundle_contains(bundle: Path, ca_cert: Path) -> bool:
    """Whether the PEM bundle holds exactly this certificate (compared by DER)."""
    try:
        data = bundle.read_bytes()
    except OSError:
        return False
    wanted = der_of(ca_cert.read_bytes())
    for block in PEM_BLOCK.findall(data):
        try:
            if der_of(block) == wanted:
                return True
        except ValueError:
            continue
    return False


class ToolTrustStore(TrustStore):
    """A store kept with one command-line tool, run through `runner`, under `root`."""

    tool: ClassVar[str]

    def __init__(self, runner: Runner | None = None, root: Path = Path("/"),
                 which: Which = shutil.which) -> None:
        self.runner = runner or SubprocessRunner()
        self.root = root
        self.which = which

    @classmethod
    def available(cls) -> bool:
        return shutil.which(cls.tool) is not None


class DistroTrustStore(ToolTrustStore):
    """A distribution store: an anchor file (or p11-kit entry) plus the tool that extracts the
    bundle every TLS library on the system reads."""

    anchor_path: ClassVar[str] = ""
    bundle_path: ClassVar[str]
    package: ClassVar[str]  # where the tool comes from, for the error message

    @property
    def anchor(self) -> Path:
        return under(self.root, self.anchor_path)

    @property
    def bundle(self) -> Path:
        return under(self.root, self.bundle_path)

    def check_tool(self) -> None:
        if self.which(self.tool) is None:
            raise UsageError(f"{self.tool} is missing: install {self.package} or use --no-trust")

    def is_trusted(self, ca_cert: Path) -> bool:
        return bundle_contains(self.bundle, ca_cert)

    def is_anchored(self) -> bool:
        """Whether an llmtap CA is registered at all (to know there is something to untrust)."""
        return self.anchor.exists()

    def _run(self, argv: list[str]) -> None:
        result = self.runner(argv)
        if not result.ok:
            raise RuntimeFailure(f"{argv[0]} failed: {result.reason()}")

    def _write_anchor(self, ca_cert: Path) -> None:
        self.anchor.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(self.anchor, ca_cert.read_bytes(), 0o644)


class DebianTrustStore(DistroTrustStore):
    name = "update-ca-certificates"
    tool = "update-ca-certificates"
    anchor_path = f"/usr/local/share/ca-certificates/{ANCHOR_NAME}.crt"  # must end in .crt
    bundle_path = "/etc/ssl/certs/ca-certificates.crt"
    package = "the ca-certificates package (apt-get install ca-certificates)"

    def update_command(self, fresh: bool = False) -> list[str]:
        command = [self.tool, "--fresh"] if fresh else [self.tool]
        if self.root == Path("/"):
            return command
        r = self.root  # the script takes every directory it works on as an option
        return [*command,
                "--certsconf", str(under(r, "/etc/ca-certificates.conf")),
                "--certsdir", str(under(r, "/usr/share/ca-certificates")),
                "--localcertsdir", str(under(r, "/usr/local/share/ca-certificates")),
                "--etccertsdir", str(under(r, "/etc/ssl/certs")),
                "--hooksdir", str(under(r, "/etc/ca-certificates/update.d"))]

    def trust(self, ca_cert: Path) -> None:
        self._write_anchor(ca_cert)
        self._run(self.update_command())

    def untrust(self) -> None:
        if self.anchor.exists():
            self.anchor.unlink()
            # --fresh: a plain run keeps the links to a removed local CA (it prunes orphans only
            # when it adds or removes something else).
            self._run(self.update_command(fresh=True))


class FedoraTrustStore(DistroTrustStore):
    name = "update-ca-trust"
    tool = "update-ca-trust"
    anchor_path = f"/etc/pki/ca-trust/source/anchors/{ANCHOR_NAME}.pem"
    bundle_path = "/etc/pki/tls/certs/ca-bundle.crt"
    package = "the ca-certificates package (dnf install ca-certificates)"

    def trust(self, ca_cert: Path) -> None:
        self._write_anchor(ca_cert)
        self._run([self.tool, "extract"])

    def untrust(self) -> None:
        if self.anchor.exists():
            self.anchor.unlink()
            self._run([self.tool, "extract"])


class ArchTrustStore(DistroTrustStore):
    """p11-kit keeps the anchor itself; we find ours by label (older CAs after a rotation too)."""

    name = "trust anchor"
    tool = "trust"
    bundle_path = "/etc/ssl/certs/ca-certificates.crt"
    package = "p11-kit (pacman -S p11-kit)"

    def trust(self, ca_cert: Path) -> None:
        self._run([self.tool, "anchor", "--store", str(ca_cert)])

    def untrust(self) -> None:
        for uri in self._anchored_uris():
            self._run([self.tool, "anchor", "--remove", uri])

    def is_anchored(self) -> bool:
        return bool(self._anchored_uris())

    def _anchored_uris(self) -> list[str]:
        result = self.runner([self.tool, "list", "--filter=ca-anchors"])
        return parse_trust_list(result.stdout, COMMON_NAME) if result.ok else []


def parse_trust_list(output: str, label: str) -> list[str]:
    """The pkcs11: URIs of `trust list` entries with this label."""
    uris, current = [], ""
    for line in output.splitlines():
        if line.startswith("pkcs11:"):
            current = line.strip()
        elif line.strip() == f"label: {label}" and current:
            uris.append(current)
    return uris


STORES: dict[str, type[DistroTrustStore]] = {
    "debian": DebianTrustStore,
    "fedora": FedoraTrustStore,
    "arch": ArchTrustStore,
}
FAMILIES = {
    "debian": ("debian", "ubuntu", "linuxmint", "pop", "raspbian", "kali", "elementary", "zorin"),
    "fedora": ("fedora", "rhel", "centos", "rocky", "almalinux", "ol", "amzn", "nobara"),
    "arch": ("arch", "manjaro", "endeavouros", "garuda", "artix"),
}


@dataclass(frozen=True)
class OsRelease:
    id: str
    id_like: tuple[str, ...]
    pretty_name: str


def read_os_release(root: Path) -> OsRelease | None:
    for candidate in ("/etc/os-release", "/usr/lib/os-release"):
        path = under(root, candidate)
        if path.is_file():
            values = dict(_os_release_pairs(path.read_text(errors="replace")))
            return OsRelease(
                id=values.get("ID", "").lower(),
                id_like=tuple(values.get("ID_LIKE", "").lower().split()),
                pretty_name=values.get("PRETTY_NAME", values.get("NAME", "unknown")),
            )
    return None


def _os_release_pairs(text: str) -> Iterable[tuple[str, str]]:
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            yield key, value.strip().strip("\"'")


def distro_family(release: OsRelease) -> str | None:
    for name in (release.id, *release.id_like):
        for family, members in FAMILIES.items():
            if name in members:
                return family
    return None


def detect_trust_store(choice: str = "auto", runner: Runner | None = None, root: Path = Path("/"),
                       which: Which = shutil.which) -> DistroTrustStore:
    """The store for this distribution (`install.trust` overrides detection); its tool must exist."""
    family = choice
    if choice == "auto":
        release = read_os_release(root)
        if release is None:
            raise UsageError(f"cannot tell the distribution ({under(root, '/etc/os-release')} is "
                             "missing): set install.trust = \"debian\", \"fedora\" or \"arch\", or use "
                             "--no-trust")
        detected = distro_family(release)
        if detected is None:
            raise UsageError(f"unsupported distribution {release.pretty_name!r} (ID={release.id}): "
                             "llmtap knows the Debian/Ubuntu, Fedora/RHEL and Arch trust stores; set "
                             "install.trust if yours works like one of them, or use --no-trust")
        family = detected
    if family not in STORES:
        raise UsageError(f"install.trust must be one of auto, {', '.join(STORES)}, not {choice!r}")
    store = STORES[family](runner, root, which)
    store.check_tool()
    return store
