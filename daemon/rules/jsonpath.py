"""Dotted JSON paths with indexes: `messages[0].content`, `metadata.user_id`, `messages[-1]`,
`messages[*].content`, `["key.with.dots"]`.

Resolving never creates anything but the last member of an object that exists (when the caller
allows it), and reports a miss, with its reason, instead of raising.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

WILDCARD = "*"  # `[*]`: every element of a list
Segment = str | int  # a key, an index, or WILDCARD (as the key "*" is written `["*"]`)

_KEY = re.compile(r"[^.\[\]\"]+")
_INDEX = re.compile(r"\[(-?\d+|\*)\]")
_QUOTED = re.compile(r"\[(\"(?:[^\"\\]|\\.)*\")\]")


class PathError(ValueError):
    """The path is not valid syntax; the message says where."""


@dataclass(frozen=True)
class Path:
    text: str
    segments: tuple[tuple[str, Segment], ...]  # ("key", name) | ("index", n) | ("all", "*")


def parse_path(text: str) -> Path:
    source = text.strip()
    rest = source[1:] if source.startswith("$") else source  # JSONPath's root is optional
    rest = rest[1:] if rest.startswith(".") and source.startswith("$") else rest
    segments: list[tuple[str, Segment]] = []
    position = 0
    while position < len(rest):
        if rest[position] == ".":
            if position == 0 or position == len(rest) - 1:
                raise PathError(f"path {text!r}: misplaced '.' at {position}")
            position += 1
        if match := _INDEX.match(rest, position):
            value = match.group(1)
            segments.append(("all", WILDCARD) if value == WILDCARD else ("index", int(value)))
        elif match := _QUOTED.match(rest, position):
            segments.append(("key", json.loads(match.group(1))))
        elif match := _KEY.match(rest, position):
            if segments and rest[position - 1] != ".":
                raise PathError(f"path {text!r}: expected '.' before {match.group(0)!r}")
            segments.append(("key", match.group(0)))
        else:
            raise PathError(f"path {text!r}: unexpected {rest[position]!r} at {position}")
        position = match.end()
    if not segments:
        raise PathError("path is empty")
    return Path(source, tuple(segments))


@dataclass(frozen=True)
class Slot:
    """One place the path names: `container[key]`; `exists` is False for a member to create."""

    container: dict[str, Any] | list[Any]
    key: str | int
    where: str  # the concrete path, e.g. messages[2].content
    exists: bool = True


def format_path(parts: list[Segment]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _KEY.fullmatch(part) and part != WILDCARD:
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def resolve(document: Any, path: Path, create_last: bool = False) -> tuple[list[Slot], str | None]:
    """The slots the path names, or none and why not. With `create_last`, a missing last key of
    an existing object is a slot to create; nothing else is ever created."""
    slots: list[Slot] = []
    misses: list[str] = []
    _walk(document, path.segments, [], create_last, slots, misses)
    return slots, (None if slots else (misses[0] if misses else f"{path.text}: nothing matched"))


def _walk(node: Any, segments: tuple[tuple[str, Segment], ...], done: list[Segment],
          create_last: bool, slots: list[Slot], misses: list[str]) -> None:
    kind, segment = segments[0]
    last = len(segments) == 1
    for key, exists in _children(node, kind, segment, done, last and create_last, misses):
        where = [*done, key]
        if last:
            slots.append(Slot(node, key, format_path(where), exists))
        else:
            _walk(node[key], segments[1:], where, create_last, slots, misses)


def _children(node: Any, kind: str, segment: Segment, done: list[Segment], may_create: bool,
              misses: list[str]) -> list[tuple[Any, bool]]:
    here = format_path(done) or "the body"
    if kind == "key":
        if not isinstance(node, dict):
            misses.append(f"{here} is not an object")
            return []
        if segment in node:
            return [(segment, True)]
        if may_create:
            return [(segment, False)]
        misses.append(f"{format_path([*done, segment])}: no such member")
        return []
    if not isinstance(node, list):
        misses.append(f"{here} is not a list")
        return []
    if kind == "all":
        if not node:
            misses.append(f"{here} is empty")
        return [(i, True) for i in range(len(node))]
    assert isinstance(segment, int)
    index = segment + len(node) if segment < 0 else segment
    if not 0 <= index < len(node):
        misses.append(f"{here}[{segment}]: index out of range (length {len(node)})")
        return []
    return [(index, True)]
