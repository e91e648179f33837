"""One call as the UI needs it: the JSON record and what its Markdown twin holds.

The request and response bodies and headers live only in the Markdown twin, which the recorder
wrote with every secret masked; the UI reads them from there, so it shows exactly what the records
show and never anything more.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtap.records import store

FENCE = re.compile(r"^(`{3,})(\w*)\s*$")
MAX_TWIN = 16 * 1024 * 1024  # a twin larger than this is read only that far


@dataclass
class Section:
    headers: list[tuple[str, str]] = field(default_factory=list)
    body_json: Any = None  # the body as JSON when it was JSON
    body_text: str | None = None  # otherwise: text (or the raw stream)
    assembled: str | None = None  # the text assembled from a stream


@dataclass
class Call:
    record: dict[str, Any]
    location: str
    markdown: str | None
    request: Section
    response: Section

    @property
    def id(self) -> str:
        return str(self.record.get("id"))

    def header(self, name: str) -> str | None:
        for key, value in self.request.headers:
            if key.lower() == name:
                return value
        return None


def load(records_dir: Path, location: str) -> Call | None:
    """The call at `location` (from the index); None when its record is gone."""
    data = store.read_location(records_dir, location)
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    twin = store.read_location(records_dir, store.markdown_location(location))
    markdown = twin[:MAX_TWIN].decode("utf-8", "replace") if twin is not None else None
    request, response = parse_twin(markdown or "")
    return Call(record, location, markdown, request, response)


def parse_twin(markdown: str) -> tuple[Section, Section]:
    """The request and response sections of a Markdown twin (see records/markdown.py)."""
    _, _, rest = markdown.partition("\n## Request\n")
    request_text, _, response_text = rest.partition("\n## Response\n")
    return _section(request_text), _section(response_text)


def _section(text: str) -> Section:
    section = Section()
    for language, body, before in _fences(text):
        if language == "http" and not section.headers:
            section.headers = [_header(line) for line in body.splitlines() if ":" in line]
        elif "Text assembled from the stream:" in before:
            section.assembled = body
        elif language == "json" and section.body_json is None:
            section.body_json = _json(body)
            if section.body_json is None:
                section.body_text = body
        elif section.body_text is None:
            section.body_text = body
    return section


def _header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip(), value.strip()


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        lines = [json.loads(chunk) for chunk in _json_lines(text)]
        return lines or None


def _json_lines(text: str) -> list[str]:
    """A Gemini stream's elements, each pretty-printed on its own lines (markdown.py)."""
    chunks, current = [], []
    for line in text.splitlines():
        current.append(line)
        if line == "}":
            chunks.append("\n".join(current))
            current = []
    try:
        [json.loads(c) for c in chunks]
    except ValueError:
        return []
    return chunks if chunks and not current else []


def _fences(text: str) -> list[tuple[str, str, str]]:
    """(language, content, the text just before it) of every top-level fenced block."""
    found: list[tuple[str, str, str]] = []
    lines = text.splitlines()
    i, before = 0, []
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            before.append(lines[i])
            i += 1
            continue
        ticks, language = match.group(1), match.group(2)
        end = i + 1
        while end < len(lines) and lines[end] != ticks:
            end += 1
        found.append((language, "\n".join(lines[i + 1:end]), "\n".join(before[-3:])))
        before = []
        i = end + 1
    return found
