"""The trust stores applications keep of their own, beside the OS store (llmtap.platform.linux.trust):
Chrome's and Firefox's NSS databases in local users' homes (when certutil exists), and Java's
cacerts keystore (when keytool exists).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from llmtap.errors import RuntimeFailure
from llmtap.platform.base import TrustStore
from llmtap.platform.linux.trust import (
    ANCHOR_NAME,
    COMMON_NAME,
    PEM_BLOCK,
    ToolTrustStore,
    der_of,
    under,
)
from llmtap.platform.runner import Runner, SubprocessRunner

# --- NSS databases (Chrome, Firefox) -------------------------------------------------------------

NSS_GLOBS = (
    ".pki/nssdb",
    ".mozilla/firefox/*",
    "snap/firefox/common/.mozilla/firefox/*",
    "snap/chromium/current/.pki/nssdb",
)


@dataclass(frozen=True)
class NssDatabase:
    directory: Path
    uid: int
    gid: int


def local_homes(root: Path) -> list[tuple[int, int, Path]]:
    """(uid, gid, home) of root and the human users in the tree's /etc/passwd."""
    passwd = under(root, "/etc/passwd")
    homes = []
    try:
        lines = passwd.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(":")
        if len(fields) < 7 or not fields[2].isdigit() or not fields[3].isdigit():
            continue
        uid, gid, home = int(fields[2]), int(fields[3]), fields[5]
        if (uid == 0 or 1000 <= uid < 65534) and home.startswith("/"):
            homes.append((uid, gid, under(root, home)))
    return homes


def find_nss_databases(homes: Iterable[tuple[int, int, Path]]) -> list[NssDatabase]:
    """The shared-format (cert9.db) databases that exist; none is ever created."""
    found = []
    for uid, gid, home in homes:
        for pattern in NSS_GLOBS:
            for directory in sorted(home.glob(pattern)):
                if (directory / "cert9.db").is_file():
                    found.append(NssDatabase(directory, uid, gid))
    return found


class NssTrustStore(TrustStore):
    """The CA in every existing NSS database of local users, added as each database's owner."""

    name = "nss"
    tool = "certutil"

    def __init__(self, databases: list[NssDatabase], runner: Runner | None = None,
                 nickname: str = COMMON_NAME, as_root: bool | None = None) -> None:
        self.databases = databases
        self.runner = runner or SubprocessRunner()
        self.nickname = nickname
        self.as_root = os.geteuid() == 0 if as_root is None else as_root

    @classmethod
    def available(cls) -> bool:
        return shutil.which(cls.tool) is not None

    def command(self, db: NssDatabase, *args: str) -> list[str]:
        argv = [self.tool, "-d", f"sql:{db.directory}", *args]
        if self.as_root and db.uid != 0:  # files root creates in a user's profile lock them out
            return ["setpriv", f"--reuid={db.uid}", f"--regid={db.gid}", "--clear-groups", "--",
                    *argv]
        return argv

    def trust(self, ca_cert: Path) -> None:
        for db in self.databases:
            self.untrust_one(db)  # an older llmtap CA under the same nickname would shadow it
            result = self.runner(self.command(db, "-A", "-t", "C,,", "-n", self.nickname,
                                              "-i", str(ca_cert)))
            if not result.ok:
                raise RuntimeFailure(f"certutil could not add the CA to {db.directory}: "
                                     f"{result.reason()}")

    def untrust(self) -> None:
        for db in self.databases:
            self.untrust_one(db)

    def untrust_one(self, db: NssDatabase) -> None:
        for _ in range(10):  # one certificate per call; rotations may have left several
            if not self.runner(self.command(db, "-L", "-n", self.nickname)).ok:
                return
            result = self.runner(self.command(db, "-D", "-n", self.nickname))
            if not result.ok:
                raise RuntimeFailure(f"certutil could not remove the CA from {db.directory}: "
                                     f"{result.reason()}")

    def is_trusted(self, ca_cert: Path) -> bool:
        wanted = der_of(ca_cert.read_bytes())
        for db in self.databases:
            result = self.runner(self.command(db, "-L", "-n", self.nickname, "-a"))
            blocks = PEM_BLOCK.findall(result.stdout.encode()) if result.ok else []
            if wanted not in {der_of(b) for b in blocks}:
                return False
        return True

    def holders(self) -> list[NssDatabase]:
        """The databases that hold an llmtap CA (any, also an older one)."""
        return [db for db in self.databases
                if self.runner(self.command(db, "-L", "-n", self.nickname)).ok]


JAVA_KEYSTORE = "/etc/ssl/certs/java/cacerts"  # Debian/Ubuntu (ca-certificates-java)
JAVA_ALIAS = f"debian:{ANCHOR_NAME}.pem"  # the alias ca-certificates-java's hook gives our anchor


class JavaTrustStore(ToolTrustStore):
    """Java's own keystore (JetBrains IDEs, Gradle, every JVM tool), with keytool.

    ca-certificates-java's hook adds the OS store's new anchors to it, but `update-ca-certificates
    --fresh` (how a removed anchor is pruned) tells hooks nothing of what it removed: the CA would
    stay trusted by Java after uninstall. So llmtap adds and removes it here itself, under the
    alias the hook uses, and the two always agree.
    """

    name = "java"
    tool = "keytool"
    alias: ClassVar[str] = JAVA_ALIAS

    @property
    def keystore(self) -> Path:
        return under(self.root, JAVA_KEYSTORE)

    def present(self) -> bool:
        """Whether this machine has a Java keystore to keep (and keytool to keep it with)."""
        return self.keystore.is_file() and self.which(self.tool) is not None

    def command(self, *args: str) -> list[str]:
        return [self.tool, *args, "-keystore", str(self.keystore), "-storepass", self.storepass()]

    def storepass(self) -> str:
        """ca-certificates-java's password (/etc/default/cacerts may change it; Java's default)."""
        try:
            text = under(self.root, "/etc/default/cacerts").read_text()
        except OSError:
            return "changeit"
        found = re.search(r"^\s*storepass=(\S+)", text, re.MULTILINE)
        return found.group(1).strip("'\"") if found else "changeit"

    def trust(self, ca_cert: Path) -> None:
        self.untrust()  # an older llmtap CA under the alias (rotation, or the hook's copy)
        result = self.runner(self.command("-importcert", "-noprompt", "-trustcacerts",
                                          "-alias", self.alias, "-file", str(ca_cert)))
        if not result.ok:
            raise RuntimeFailure(f"keytool could not add the CA to {self.keystore}: {result.reason()}")

    def untrust(self) -> None:
        if not self.holds():
            return
        result = self.runner(self.command("-delete", "-noprompt", "-alias", self.alias))
        if not result.ok:
            raise RuntimeFailure(f"keytool could not remove the CA from {self.keystore}: "
                                 f"{result.reason()}")

    def holds(self) -> bool:
        """Whether an llmtap CA (any) is in the keystore."""
        return self.runner(self.command("-list", "-alias", self.alias)).ok

    def is_trusted(self, ca_cert: Path) -> bool:
        result = self.runner(self.command("-exportcert", "-rfc", "-alias", self.alias))
        blocks = PEM_BLOCK.findall(result.stdout.encode()) if result.ok else []
        return der_of(ca_cert.read_bytes()) in {der_of(b) for b in blocks}
