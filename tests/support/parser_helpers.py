"""Shared helpers for the parser tests: run a fixture through a parser in given chunks."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from typing import Any

from hypothesis import strategies as st
from llmtap.parsers import parse_request, response_parser
from llmtap.parsers.base import Limits
from streams import FIXTURES, load

T0 = 1_700_000_000.0  # a wall-clock start; feeds happen at T0 + offsets


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`data` cut at the given offsets (any order, duplicates and out-of-range ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def cuts_for(data: bytes, max_cuts: int = 40) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(min_value=1, max_value=max(1, len(data) - 1)), max_size=max_cuts)


def run(
    name: str,
    chunks: list[bytes] | None = None,
    *,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
    request_body: bytes = b"",
    limits: Limits | None = None,
    at: float = 0.25,
) -> dict[str, Any]:
    """Parses fixture `name` (or the given chunks of it) as its request would have it parsed."""
    fixture = FIXTURES[name]
    info = parse_request(fixture.host, "POST", fixture.path, request_body)
    parser = response_parser(
        info,
        started=T0,
        status=fixture.status if status is None else status,
        headers=headers if headers is not None else {"content-type": fixture.content_type},
        **({"limits": limits} if limits else {}),
    )
    for chunk in chunks if chunks is not None else [load(name)]:
        parser.feed(chunk, T0 + at)
    parser.feed(b"", T0 + at + 0.01)
    return parser.result()


def stable(result: dict[str, Any]) -> dict[str, Any]:
    """A result without what legitimately depends on the chunking."""
    return {k: v for k, v in result.items() if k not in ("chunks", "timeline")}


def usage(**counts: int | None) -> dict[str, int | None]:
    keys = (
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_5m_tokens",
        "cache_write_1h_tokens",
        "reasoning_tokens",
    )
    return {k: counts.get(k, 0) for k in keys}


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()
