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
