"""Windows attribution: which process opened each redirected connection, asked and answered as on
Linux (llmtap.proclookup's question, `answer` and description; addons.attribution's stage).

The proxy's peer is the loopback side of the redirect (LO:cp); the redirect table gives the
client's real connection (C:cp -> T:443), and GetExtendedTcpTable the pid owning exactly that
socket (llmtap.platform.windows.tcptable). There is no second process to ask: the answer is
computed on a worker thread of the proxy's loop (Attribution's `resolve`).
"""

from __future__ import annotations

import json
from typing import Any

from llmtap.flow import Process
from llmtap.platform.windows.loopback import Redirector
from llmtap.platform.windows.tcptable import TcpOwners
from llmtap.proclookup import Lookup, answer


class RedirectedLookup(Lookup):
    def __init__(self, redirector: Redirector, owners: TcpOwners | None = None) -> None:
        super().__init__()
        self.redirector = redirector
        self.owners = owners or TcpOwners()

    def _pid(self, ip: str, port: int, remote: tuple[str, int] | None) -> int | None:
        try:
            flow = self.redirector.flow_of((ip, port))
        except LookupError:
            return None
        return self.owners.owner(flow.client, flow.server)


class Resolver:
    """Attribution's `resolve`: the question dict in, the `process` of proclookup's answer out."""

    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup

    def __call__(self, question: dict[str, Any]) -> Process | None:
        reply = json.loads(answer(self.lookup, json.dumps(question).encode()))
        process: Process | None = reply.get("process")
        return process


def resolver_for(backend: object) -> Resolver | None:
    """The resolver for a WinDivert backend (None for any other: nothing to attribute by)."""
    redirector = getattr(backend, "redirector", None)
    return Resolver(RedirectedLookup(redirector)) if isinstance(redirector, Redirector) else None
