"""Whether this process is elevated (Administrator): WinDivert, the Root store, services need it."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from llmtap.errors import UsageError

ElevationCheck = Callable[[], bool]


def is_elevated() -> bool:
    windll = getattr(ctypes, "windll", None)  # absent off Windows
    if windll is None:
        return False
    try:
        return bool(windll.shell32.IsUserAnAdmin())
    except OSError:
        return False


def require_elevated(action: str, check: ElevationCheck = is_elevated) -> None:
    if not check():
        raise UsageError(f"{action} needs Administrator rights: run it from an elevated terminal")


HIGH_INTEGRITY_SIDS = ("S-1-16-12288", "S-1-16-16384")  # High, System mandatory levels


def elevated_per_whoami(output: str) -> bool:
    """`whoami /groups`: elevated when the token's integrity label is High (or System); a
    filtered admin token is Medium and lists Administrators "for deny only"."""
    for line in output.splitlines():
        if line.startswith("Mandatory Label\\"):
            return any(sid in line.split() for sid in HIGH_INTEGRITY_SIDS)
    return False
