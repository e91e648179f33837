"""Masking held secrets by value, wherever llmtap writes or shows anything.

Shapes (key prefixes, DLP detectors) miss a key with no known prefix, such as an Azure-style
32-hex key. A SecretMask knows the values themselves, current and rotated-out, and finds each in
the encodings it travels in: as is, URL-encoded (query strings, form bodies) and base64 (Basic
auth, data URLs, JSON-in-base64), standard and URL-safe, at any of the three byte alignments a
value can start at inside a longer base64 text.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

MIN_SECRET = 8  # shorter values would mask ordinary text; no provider key is this short
MIN_BASE64 = 8  # characters of an encoding that must match, at the least
MARKER = "[REDACTED:held_key]"


def base64_forms(value: bytes) -> set[str]:
    """The runs of base64 text that encode `value` wherever it starts inside a longer input:
    with 0, 1 or 2 bytes before it, only the characters made from its bytes alone."""
    forms = set()
    for lead in range(3):
        encoded = base64.b64encode(b"\0" * lead + value).decode().rstrip("=")
        first = (lead * 8 + 5) // 6  # the first character made from value's bits alone
        last = (lead + len(value)) * 8 // 6  # characters fully made before the end
        run = encoded[first:last]
        if len(run) >= MIN_BASE64:
            forms |= {run, run.replace("+", "-").replace("/", "_")}
    return forms


def encoded_forms(value: str) -> set[str]:
    """The value and the forms it takes in URLs and base64."""
    forms = {value, quote(value, safe=""), quote_plus(value)}
    forms |= base64_forms(value.encode())
    return {form for form in forms if form}


class SecretMask:
    """Replaces every held secret value, in each of its encodings, by MARKER. Falsy when it
    holds none (then every method returns its input unchanged, at no cost)."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        forms: set[str] = set()
        for value in values:
            if len(value) >= MIN_SECRET:
                forms |= encoded_forms(value)
        ordered = sorted(forms, key=len, reverse=True)  # the longest form wins where two overlap
        self._text = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._bytes = re.compile(b"|".join(re.escape(f.encode()) for f in ordered)) if ordered else None

    def __bool__(self) -> bool:
        return self._text is not None

    def text(self, text: str) -> str:
        return self._text.sub(MARKER, text) if self._text is not None else text

    def data(self, data: bytes) -> bytes:
        return self._bytes.sub(MARKER.encode(), data) if self._bytes is not None else data

    def in_data(self, data: bytes) -> bool:
        """Whether a held value may be in `data` (UTF-8): a gate that needs no decoded copy."""
        return self._bytes is not None and self._bytes.search(data) is not None

    def found_in(self, text: str) -> list[tuple[int, int]]:
        """Where held values are in `text` (start, end)."""
        return [m.span() for m in self._text.finditer(text)] if self._text is not None else []

    def deep(self, value: Any) -> Any:
        """A copy of a JSON-like value with every string (keys too) masked."""
        if self._text is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.deep(k): self.deep(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.deep(v) for v in value)
        return value


NO_MASK = SecretMask()
