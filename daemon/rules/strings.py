"""The strings of a request body that text rules and DLP read and change.

A JSON body is walked recursively, and every string in it is a leaf, except the fields that must
not change or the provider rejects the request: signatures of thinking blocks, tool-use ids,
base64 image/document data (see DEFAULT_PROTECTED_FIELDS; `[rules] extra_protected_fields` adds
to it). A body that is text but not JSON is one leaf.

Scanning 200 KB in a thousand leaves one leaf at a time costs milliseconds, so scanners search
`Strings.snapshot()`, the leaves joined by newlines, once, and `touching()` maps what they found
back to the leaves, which they then handle one by one.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llmtap.rules.jsonpath import format_path

# "KEYS" or "TYPE:KEYS". KEYS is a dotted list of member names matched against the end of a
# string's path (list indexes do not count); TYPE also requires the object holding the last
# member to have that "type". A protected object or list is skipped whole.
DEFAULT_PROTECTED_FIELDS: tuple[str, ...] = (
    "thinking:signature",  # Anthropic extended thinking: the signature covers the thinking
    "thinking:thinking",
    "redacted_thinking:data",
    "base64:data",  # Anthropic image and document sources
    "id",  # tool_use and server_tool_use ids, message and item ids
    "tool_use_id",
    "tool_call_id",  # OpenAI Chat Completions
    "call_id",  # OpenAI Responses
    "previous_response_id",
    "file_id",
    "file_data",  # OpenAI file inputs (base64)
    "input_audio.data",
    "encrypted_content",  # OpenAI Responses reasoning items
    "inlineData.data",  # Gemini
    "inline_data.data",
    "thoughtSignature",
    "thought_signature",
)
SEPARATOR = "\n"
_FIELD = re.compile(r"^(?:([A-Za-z0-9_.-]+):)?([^.:\s]+(?:\.[^.:\s]+)*)$")
_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+(?:;[\w.+-]+=[\w.+-]+)*;base64,", re.ASCII)


@dataclass(frozen=True)
class FieldSpec:
    type: str | None
    keys: tuple[str, ...]


def parse_field_spec(text: str) -> FieldSpec:
    match = _FIELD.match(text.strip())
    if not match:
        raise ValueError(f"protected field {text!r} is not KEY, KEY.KEY or TYPE:KEY")
    return FieldSpec(match.group(1), tuple(match.group(2).split(".")))


class Protected:
    """Which strings must never change."""

    def __init__(self, specs: Iterable[str] = DEFAULT_PROTECTED_FIELDS) -> None:
        self.specs = tuple(dict.fromkeys(specs))
        self.by_last: dict[str, list[FieldSpec]] = {}
        for spec in map(parse_field_spec, self.specs):
            self.by_last.setdefault(spec.keys[-1], []).append(spec)

    def covers(self, keys: Sequence[str], parent: dict[str, Any]) -> bool:
        """Whether the member `keys[-1]` of `parent` (reached through `keys`) is protected."""
        return _covered(self.by_last.get(keys[-1], ()), keys, parent)


def _covered(specs: Iterable[FieldSpec], keys: Sequence[str], parent: dict[str, Any]) -> bool:
    for spec in specs:
        if spec.type is not None and parent.get("type") != spec.type:
            continue
        if len(spec.keys) == 1 or tuple(keys[-len(spec.keys):]) == spec.keys:
            return True
    return False


def is_data_url(value: str) -> bool:
    """Inline base64 data (`data:image/png;base64,...`) is protected wherever it is."""
    return value.startswith("data:") and _DATA_URL.match(value) is not None


class Strings:
    """The leaves of one body, and a snapshot of them joined, as UTF-8 (what RE2 reads).

    The snapshot is taken once: a leaf changed since (`replace`) is "dirty", and scanners
    look at the dirty leaves as well as at what they find in the snapshot, since a match lies
    within one leaf and only a changed leaf can have a new one.
    """

    def __init__(self, holder: list[Any], protected: Protected) -> None:
        self.places: list[tuple[Any, str | int, tuple[str | int, ...]]] = []  # (container, key,
        # path of the container) of each leaf
        self.values: list[str] = []
        self.dirty: set[int] = set()
        self.version = 0  # counts replacements
        self._holder = holder
        self._by_last = protected.by_last
        self._snapshot: bytes | None = None
        self._starts: list[int] = []
        self._walk(holder, (), [])

    def _walk(self, node: Any, path: tuple[str | int, ...], names: list[str]) -> None:
        """The hot loop of every body: JSON gives exact types, so `type() is` (faster than
        isinstance) is safe; `names` (member names down to `node`) changes per container."""
        places, values = self.places, self.values
        if type(node) is dict:
            for name, child in node.items():
                specs = self._by_last.get(name)
                if specs is not None and _covered(specs, (*names, name), node):
                    continue
                kind = type(child)
                if kind is str:
                    if not (child.startswith("data:") and is_data_url(child)):
                        places.append((node, name, path))
                        values.append(child)
                elif kind is dict or kind is list:
                    names.append(name)
                    self._walk(child, (*path, name), names)
                    names.pop()
            return
        for index, child in enumerate(node):
            kind = type(child)
            if kind is str:
                if not (child.startswith("data:") and is_data_url(child)):
                    places.append((node, index, path))
                    values.append(child)
            elif kind is dict or kind is list:
                self._walk(child, (*path, index) if node is not self._holder else path, names)

    def __len__(self) -> int:
        return len(self.values)

    def where(self, index: int) -> str:
        container, key, path = self.places[index]
        return "(body)" if container is self._holder else format_path([*path, key])

    def snapshot(self) -> bytes:
        """The leaves as they were first seen, joined by newlines, in UTF-8."""
        if self._snapshot is None:
            text = SEPARATOR.join(self.values)
            self._snapshot = text.encode("utf-8", "surrogatepass")
            if len(self._snapshot) == len(text):  # ASCII: byte lengths are str lengths
                lengths: Iterable[int] = map(len, self.values)
            else:
                lengths = [len(v.encode("utf-8", "surrogatepass")) for v in self.values]
            self._starts = list(itertools.accumulate((n + 1 for n in lengths), initial=0))[:-1]
        return self._snapshot

    def dirty_text(self) -> bytes:
        """The changed leaves, as they are now, joined (to re-check gates on)."""
        return SEPARATOR.join(self.values[i] for i in sorted(self.dirty)).encode(
            "utf-8", "surrogatepass")

    def touching(self, spans: Iterable[tuple[int, int]]) -> list[int]:
        """The leaves any of these byte spans of `snapshot()` overlap, and the dirty leaves."""
        self.snapshot()
        found = set(self.dirty)
        for start, end in spans:
            first = bisect.bisect_right(self._starts, start) - 1
            last = bisect.bisect_right(self._starts, max(start, end - 1)) - 1
            found.update(range(max(first, 0), last + 1))
        return sorted(found)

    def replace(self, index: int, value: str) -> None:
        container, key, _ = self.places[index]
        container[key] = value
        self.values[index] = value
        self.dirty.add(index)
        self.version += 1


class Body:
    """A request body, parsed once: a JSON document or a text, with its strings."""

    def __init__(self, kind: str, document: Any, raw: bytes | None) -> None:
        self.kind = kind  # "json" | "text"
        self.holder: list[Any] = [document]
        self.raw = raw  # the request's raw_content this was parsed from
        self.changed = False
        self._strings: Strings | None = None
        self._protected: Protected | None = None

    @property
    def document(self) -> Any:
        return self.holder[0]

    @classmethod
    def parse(cls, content: bytes, content_type: str, raw: bytes | None = None) -> Body | str:
        """The body, or why it cannot be read as JSON or text."""
        try:
            return cls("json", json.loads(content), raw)
        except (ValueError, RecursionError):
            pass
        if content_type.lower().startswith(("multipart/", "image/", "audio/", "video/")):
            return "body is not JSON or text"
        try:
            return cls("text", content.decode("utf-8"), raw)
        except UnicodeDecodeError:
            return "body is not JSON or text"

    def strings(self, protected: Protected) -> Strings:
        if self._strings is None or self._protected is None or self._protected.specs != protected.specs:
            self._strings = Strings(self.holder, protected)
            self._protected = protected
        return self._strings

    def structure_changed(self) -> None:
        """After a change other than `Strings.replace` (a JSON path set): walk again."""
        self.changed = True
        self._strings = None

    def serialize(self) -> bytes:
        if self.kind == "text":
            return str(self.document).encode("utf-8")
        return json.dumps(self.document, ensure_ascii=False, separators=(",", ":"),
                          check_circular=False).encode("utf-8")  # parsed JSON has no cycles
