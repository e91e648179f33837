"""Which record is THE billed call: every other record of the same call is `counted: false`.

A call is billed once, but may be recorded many times: a background response is created, polled
and retrieved (`GET /v1/responses/{id}`, also `?stream=true`), batch results are downloaded again,
a Responses WebSocket adds its upgrade, and listings or token counts are no calls at all. This
step marks each record `counted` (true or false) and, when it belongs to a provider's id that is
billed elsewhere, `repeat_of: <that id>`; the record that bills an id carries `billed_id`.
Pricing gives uncounted records no cost; stats and the dashboard do not count them as calls.

- Responses: a create (`POST .../responses`) is the call, unless `background: true` left it
  queued; then the first record of that id that shows a terminal status (completed, failed,
  incomplete, cancelled: a poll, a resumed stream) bills it, once. Every other record of the id
  (the queued create, polls before and after, DELETE, /cancel, /input_items) is a repeat.
- Each response over a Responses WebSocket is a call; the upgrade (status 101) and a failed
  upgrade are not.
- Anthropic batch results: the first complete download of a batch bills it (batch prices);
  downloading it again does not. Creating, listing, polling or cancelling batches is no call.
- No call: model listings, count_tokens, input_tokens, OpenAI files/batches/uploads/conversations,
  stored chat completions read back.

Ids already billed are remembered (bounded, newest kept) and, once forgotten or after a restart,
looked up in the records index (`billed_id`), so a retrieval next week is still a repeat.
"""

from __future__ import annotations

import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtap.flow import WS_EXCHANGE, Record, fields
from llmtap.parsers.base import as_dict
from llmtap.records.index import BilledLookup, index_path
from mitmproxy import ctx, http

NOTE = "not counted: "
REMEMBERED = 20_000  # billed ids kept in memory (~2 MB); older ones are asked of the index
TERMINAL = frozenset({"completed", "failed", "incomplete", "cancelled"})
NOT_CALLS = frozenset({"models", "messages.count_tokens", "countTokens", "responses.input_tokens",
                       "messages.batches", "count-tokens"})  # count-tokens: Bedrock's
RESPONSE_PATH = re.compile(r"/responses/(?P<id>[^/]+)(?P<sub>/[^/]+)?$")
BATCH_RESULTS = re.compile(r"/messages/batches/(?P<id>[^/]+)/results$")
# Endpoints no parser reads that manage state rather than call a model.
HOUSEKEEPING = re.compile(r"/v1/(files|batches|uploads|conversations)(/|$)"
                          r"|/chat/completions/[^/]+(/messages)?$")


@dataclass(frozen=True)
class Decision:
    """counted: True or False, or None for "if `key` is not billed yet" (then this bills it)."""

    counted: bool | None
    key: str | None = None  # the provider's id of the call this record belongs to
    why: str | None = None  # said in the record's notes when it does not count


def decide(record: Mapping[str, Any], method: str, path: str, *, status: int | None = 200,
           upgrade: bool = False, ws_exchange: bool = False) -> Decision:
    """The decision for one record (its fields so far and the response's status), from what it
    is, not from what came before."""
    bare = path.split("?", 1)[0].split("#", 1)[0].rstrip("/")  # as classify() reads it
    api = record.get("api")
    if ws_exchange:
        return Decision(True, _str(record.get("response_id")))
    if upgrade:
        return Decision(False, None, "a WebSocket upgrade: each response on it is its own record")
    if api in NOT_CALLS or (api in ("unknown", None) and HOUSEKEEPING.search(bare)):
        return Decision(False, None, "not a model call")
    if api == "messages.batches.results" and (match := BATCH_RESULTS.search(bare)):
        complete = status == 200 and record.get("error") is None
        return Decision(None if complete else False, match["id"],
                        "batch results are billed at their first complete download")
    if api == "responses" or (api == "unknown" and RESPONSE_PATH.search(bare)):
        return _responses(record, method.upper(), bare)
    return Decision(True)


def _responses(record: Mapping[str, Any], method: str, bare: str) -> Decision:
    match = RESPONSE_PATH.search(bare)
    key = _str(record.get("response_id")) or (match["id"] if match else None)
    if (match and match["sub"]) or method == "DELETE":  # /cancel, /input_items, a deletion
        return Decision(False, key, "not a model call")
    final = record.get("response_status") in TERMINAL
    if match is None and method == "POST":  # a create
        background = as_dict(record.get("request")).get("background") is True
        if not background or key is None:  # a call (or a failed attempt at one)
            return Decision(True, key)
        return Decision(None if final else False, key, "a background response, billed when done")
    return Decision(None if final else False, key, "a retrieval of a stored response")


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class BilledIds:
    """Provider ids already billed: the newest in memory, the rest asked of `lookup`."""

    def __init__(self, lookup: Callable[[str], bool] | None = None,
                 remembered: int = REMEMBERED) -> None:
        self.lookup = lookup
        self.remembered = remembered
        self._ids: OrderedDict[str, None] = OrderedDict()

    def billed(self, key: str) -> bool:
        if key in self._ids:
            self._ids.move_to_end(key)
            return True
        if self.lookup is not None and self.lookup(key):
            self.add(key)
            return True
        return False

    def add(self, key: str) -> None:
        self._ids[key] = None
        self._ids.move_to_end(key)
        while len(self._ids) > self.remembered:
            self._ids.popitem(last=False)


class Counting:
    observes_response = True  # its response hook may run after the response is relayed

    def __init__(self, billed: BilledIds | None = None) -> None:
        self.billed = billed or BilledIds()
        self._lookup: BilledLookup | None = None
        self._decided: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("llmtap_records_dir", str, "", "Directory for the exchange records.")

    def configure(self, updated: set[str]) -> None:
        if "llmtap_records_dir" not in updated or self.billed.lookup not in (None, self._lookup):
            return  # a lookup given by the caller stays
        if self._lookup is not None:
            self._lookup.close()
        directory = ctx.options.llmtap_records_dir
        self._lookup = BilledLookup(index_path(Path(directory))) if directory else None
        self.billed.lookup = self._lookup

    def response(self, flow: http.HTTPFlow) -> None:
        self.count(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.count(flow)

    def count(self, flow: http.HTTPFlow) -> None:
        if flow in self._decided:
            return  # decided at its response; an error after it changes nothing
        self._decided.add(flow)
        record = fields(flow)
        status = flow.response.status_code if flow.response else None
        # A refused upgrade is no call; but a client's Upgrade header on a request the server
        # answered normally (2xx, no 101) must not make a billed call uncounted.
        asked = "websocket" in flow.request.headers.get("upgrade", "").lower()
        upgrade = flow.websocket is not None or status == 101 or (
            asked and not (status is not None and 200 <= status < 300))
        decision = decide(record, flow.request.method, flow.request.path, status=status,
                          upgrade=upgrade, ws_exchange=WS_EXCHANGE in flow.metadata)
        self.apply(record, decision)

    def apply(self, record: Record, decision: Decision) -> None:
        """Sets `counted` and its company, over any a WebSocket exchange took from its upgrade."""
        counted, key = decision.counted, decision.key
        if counted is None:
            counted = key is None or not self.billed.billed(key)
        record["counted"] = counted
        record.pop("billed_id", None)
        record.pop("repeat_of", None)
        notes = [n for n in record.get("notes", []) if not n.startswith(NOTE)]
        if notes:
            record["notes"] = notes
        else:
            record.pop("notes", None)
        if counted and key is not None:
            self.billed.add(key)
            record["billed_id"] = key
        elif not counted:
            if key is not None:
                record["repeat_of"] = key
            if decision.why:
                record["notes"] = [*notes, NOTE + decision.why]

    def done(self) -> None:
        if self._lookup is not None:
            self._lookup.close()
