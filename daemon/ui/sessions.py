"""Calls grouped into agent sessions.

First by the client's own identifiers: Claude Code's `x-claude-code-session-id` header and the
session in its `metadata.user_id`; Codex's `session_id`/`conversation_id` headers and its
`prompt_cache_key`; OpenAI Responses' `previous_response_id` chains. Otherwise by prompt-prefix
continuity: calls whose system prompt and first message are the same continue one conversation.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtap.parsers.request import client_session
from llmtap.records.capture import MASK
from llmtap.ui.calls import Call, load
from llmtap.ui.conversation import conversation
from llmtap.ui.streams import response_id

SESSION_HEADERS = (("x-claude-code-session-id", "claude-code"), ("session_id", "codex"),
                   ("conversation_id", "codex"), ("x-session-id", "session"))
MAX_CACHED = 50_000
# What a client adds to the user's words (Claude Code's reminders): not what names a session.
INJECTED = re.compile(r"<(system-reminder|command-[a-z-]+|local-command-[a-z-]+)>.*?</\1>", re.S)


@dataclass(frozen=True)
class Facts:
    """What grouping needs of a call; records never change, so this is cached by id."""

    key: str | None  # the client's own session id, when it sent one
    previous: str | None  # previous_response_id
    response: str | None  # this call's response id
    prefix: str  # system prompt + first message, hashed
    label: str  # the first user words, for people


def facts(call: Call) -> Facts:
    body = call.request.body_json if isinstance(call.request.body_json, dict) else {}
    convo = conversation(call)
    first = next((t for t in convo.turns if t.role == "user"), None)
    words = " ".join(p.text for p in first.parts if p.kind == "text") if first else ""
    words = INJECTED.sub(" ", words).strip() or words
    prefix = hashlib.sha256(json.dumps([convo.system, first.key() if first else None]).encode())
    previous = body.get("previous_response_id")
    return Facts(_own_key(call, body), str(previous) if previous else None, response_id(call),
                 prefix.hexdigest()[:16], " ".join(words.split())[:120])


def _own_key(call: Call, body: dict[str, Any]) -> str | None:
    for header, client in SESSION_HEADERS:
        value = call.header(header)
        if value and MASK not in value:  # the recorder masks session headers: none to group by
            return f"{client}:{value[:80]}"
    if session := client_session(body):
        return f"{session[0]}:{session[1]}"
    return None


class Sessions:
    """Assigns session keys to calls, oldest first, remembering what it learnt."""

    def __init__(self, records_dir: Path) -> None:
        self.records_dir = records_dir
        self._facts: OrderedDict[str, Facts] = OrderedDict()
        self._by_response: dict[str, str] = {}

    def facts_of(self, row: Any) -> Facts | None:
        record_id = str(row["id"])
        if record_id in self._facts:
            return self._facts[record_id]
        call = load(self.records_dir, str(row["location"]))
        if call is None:
            return None
        found = facts(call)
        self._facts[record_id] = found
        while len(self._facts) > MAX_CACHED:
            self._facts.popitem(last=False)
        return found

    def assign(self, rows: list[Any]) -> dict[str, str]:
        """record id -> session key, for the model calls among rows (oldest first)."""
        keys: dict[str, str] = {}
        for row in rows:
            if not row["model"]:
                continue  # not a model call (a client's settings, a health check)
            found = self.facts_of(row)
            if found is None:
                continue
            key = found.key
            if key is None and found.previous:
                key = self._by_response.get(found.previous)
            key = key or f"prefix:{found.prefix}"
            if found.response:
                self._by_response[found.response] = key
                if len(self._by_response) > MAX_CACHED:
                    self._by_response.pop(next(iter(self._by_response)))
            keys[str(row["id"])] = key
        return keys

    def label(self, row: Any) -> str:
        found = self.facts_of(row)
        return found.label if found else ""
