"""How llmtap shows numbers and client strings to people: one place for the CLI, the dashboard
and the web UI."""

from __future__ import annotations

import datetime
import re
from typing import Any

NONE = "—"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def tokens(value: Any) -> str:
    """1234 -> "1234", 12345 -> "12.3k", 1234567 -> "1.23M"."""
    if value is None:
        return NONE
    value = int(value)
    if value >= 1_000_000:
        return f"{value / 1_000_000:.2f}M"
    return f"{value / 1000:.1f}k" if value >= 10_000 else str(value)


def money(value: Any) -> str:
    """USD: four decimals under a dollar (calls cost fractions of a cent), two above."""
    if value is None:
        return NONE
    return f"${float(value):.4f}" if float(value) < 1 else f"${float(value):.2f}"


def millis(value: Any) -> str:
    return NONE if value is None else f"{float(value):.0f}ms"


def local_time(started_ts: float | None) -> str:
    if started_ts is None:
        return "?"
    return datetime.datetime.fromtimestamp(started_ts).strftime("%Y-%m-%d %H:%M:%S")


def printable(text: str) -> str:
    """`text` safe for a terminal: a model name, a path or a prompt is the client's, and an
    escape sequence in it would act on the admin's terminal (erase lines, set the clipboard)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
