"""Chooses the redirect mechanism for this OS (one module per mechanism under llmtap.platform)."""

from __future__ import annotations

import sys

from llmtap.errors import UsageError
from llmtap.platform.base import RedirectBackend

INSTALL_HINT = {
    "nft": "install nftables (apt-get install nftables)",
    "iptables": "install iptables (apt-get install iptables)",
    "pf": "pf needs /sbin/pfctl, part of macOS",
    "windivert": "install pydivert (pip install 'pydivert>=2.0.3,<=2.1.0')",
}


def backends_for_this_os() -> list[type[RedirectBackend]]:
    """Every mechanism of this OS, in order of preference."""
    if sys.platform.startswith("linux"):
        from llmtap.platform.linux.iptables import IptablesBackend
        from llmtap.platform.linux.nft import NftBackend

        return [NftBackend, IptablesBackend]
    if sys.platform == "darwin":
        from llmtap.platform.macos.pf import PfBackend

        return [PfBackend]
    if sys.platform == "win32":
        from llmtap.platform.windows.windivert import WindivertBackend

        return [WindivertBackend]
    return []


def choose_backend(name: str) -> type[RedirectBackend]:
    candidates = backends_for_this_os()
    if name == "auto":
        for backend in candidates:
            if backend.available():
                return backend
        if sys.platform.startswith("linux"):
            raise UsageError("neither nft nor iptables is usable here: install nftables "
                             "(apt-get install nftables) or iptables")
        raise UsageError(f"no redirect backend is available on {sys.platform}")
    for backend in candidates:
        if backend.name == name:
            if not backend.available():
                hint = INSTALL_HINT.get(name, "check that it is installed")
                raise UsageError(f"redirect.backend = {name!r} is not usable here: {hint}")
            return backend
    raise UsageError(f"redirect.backend = {name!r} does not exist on {sys.platform}")


def cleanup_all() -> list[str]:
    """Removes every llmtap rule of every mechanism; the names of those that had some."""
    return [b.name for b in backends_for_this_os() if b.available() and b.cleanup_leftovers()]


def rules_present() -> dict[str, bool]:
    return {b.name: b.rules_present() for b in backends_for_this_os() if b.available()}
