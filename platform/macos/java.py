"""macOS Java: each JDK keeps its own `cacerts` and ignores the keychain (JetBrains IDEs' own
runtime aside), so install adds the CA to every system-wide JDK with that JDK's keytool.

JDKs live in /Library/Java/JavaVirtualMachines (installers, and Homebrew's when linked there) and
in Homebrew's prefixes; a JDK reached twice through a symlink is kept once.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmtap.platform.linux.app_trust import JavaTrustStore
from llmtap.platform.linux.trust import under
from llmtap.platform.runner import Runner

JDK_PATTERNS = (
    "/Library/Java/JavaVirtualMachines/*/Contents/Home",
    "/opt/homebrew/opt/openjdk*/libexec/openjdk.jdk/Contents/Home",
    "/usr/local/opt/openjdk*/libexec/openjdk.jdk/Contents/Home",
)
CACERTS = "lib/security/cacerts"


def jdk_homes(root: Path) -> list[Path]:
    """The JDK homes with a cacerts, as the system sees them, each once."""
    found: dict[str, Path] = {}
    for pattern in JDK_PATTERNS:
        for home in sorted(root.glob(pattern.lstrip("/"))):
            if (home / CACERTS).is_file():
                real = Path("/") / home.relative_to(root)
                found.setdefault(os.path.realpath(home), real)
    return list(found.values())


class JdkTrustStore(JavaTrustStore):
    """One JDK's cacerts (password `changeit`, as every JDK ships it), under the alias llmtap."""

    name = "java"
    alias = "llmtap"

    def __init__(self, home: Path, runner: Runner, root: Path = Path("/")) -> None:
        super().__init__(runner, root)
        self.home = home  # as the system sees it

    @property
    def keystore(self) -> Path:
        return under(self.root, self.home / CACERTS)

    def present(self) -> bool:
        return self.keystore.is_file()

    def command(self, *args: str) -> list[str]:
        keytool = under(self.root, self.home / "bin" / "keytool")
        return [str(keytool), *args, "-keystore", str(self.keystore), "-storepass", "changeit"]
