"""What happens to each diverted packet: the redirect toward a proxy that listens on loopback only.

A client's connection `C:cp -> T:443` is rewritten, packet by packet, to `LO:cp -> LO:proxy`
(LO = 127.0.0.1 or ::1, by family) and re-injected *outbound*, which Windows routes over its
loopback path to the proxy's 127.0.0.1 (or ::1) listener. The proxy's replies `LO:proxy -> LO:cp`
are diverted and rewritten to `T:443 -> C:cp`, re-injected outbound too: C is a local address, so
they also take the loopback path to the client's socket.

Why this shape (WinDivert cannot inject *inbound* toward 127.0.0.1, so mitmproxy <= 6 sent the
packet to the client's own address and listened on every address):
  * basil00/WinDivert#82 (2024): injecting toward a loopback listener works when both the source
    and the destination become 127.0.0.1 and the packet stays outbound (loopback packets are
    always outbound to WinDivert); a 127.0.0.1 destination with a non-loopback source fails
    (ERROR_INVALID_NETNAME, the first report in that issue).
  * mitmproxy <= 6 (mitmproxy/platform/windows.py, TransparentProxy.redirect_response) re-sent
    the proxy's replies outbound, unchanged in direction, after rewriting their source to the
    server: a packet to a local address is delivered over loopback.
  * safing/portmaster-windows-kext#16: "InjectNetworkReceive does not work for loopback packet
    but send works" — the same finding, in another WFP driver.

The table is keyed by the loopback-side endpoint the proxy sees as its peer (LO, cp). A port held
by two redirected clients at once (a different C, same cp and family) cannot be told apart on
loopback: the second connection is dropped, never mixed up (mitmproxy <= 6 had the same limit and
documented it). A process on this machine that connects straight to the loopback listener has no
entry, and one that binds LO:cp itself is told apart by the real socket it owns (`direct`).
"""

from __future__ import annotations

import collections
import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from llmtap.platform.base import RedirectPlan, TargetAddresses
from llmtap.platform.windows.packets import TCP_RST, Endpoint, normalize, parse_tcp, rewrite

TABLE_CAPACITY = 65536
LOOPBACK = {4: "127.0.0.1", 6: "::1"}
# A port's entry is another client's for this long after its last packet (TIME_WAIT is 2 x 2 min
# on Windows by default, but its last packets come within the first 2 minutes).
BUSY_S = 120.0


@dataclass(frozen=True)
class Flow:
    """One redirected connection: who the client is and whom it believes it talks to."""

    client: Endpoint
    server: Endpoint


class Flows:
    """(LO, client port) -> Flow; a thread-safe bounded LRU that knows when each was last used."""

    def __init__(self, capacity: int = TABLE_CAPACITY, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.capacity = capacity
        self.clock = clock
        self._map: collections.OrderedDict[Endpoint, tuple[Flow, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def remember(self, key: Endpoint, flow: Flow) -> None:
        with self._lock:
            self._map[key] = (flow, self.clock())
            self._map.move_to_end(key)
            while len(self._map) > self.capacity:
                self._map.popitem(last=False)

    def get(self, key: Endpoint, touch: bool = False) -> Flow | None:
        with self._lock:
            found = self._map.get(key)
            if found is None:
                return None
            if touch:
                self._map[key] = (found[0], self.clock())
            return found[0]

    def busy_with_another(self, key: Endpoint, client: Endpoint) -> bool:
        with self._lock:
            found = self._map.get(key)
        return (found is not None and found[0].client != client
                and self.clock() - found[1] < BUSY_S)

    def forget(self, key: Endpoint) -> None:
        with self._lock:
            self._map.pop(key, None)

    def __len__(self) -> int:
        return len(self._map)


def loopback_of(address: str) -> str:
    return LOOPBACK[6 if ":" in address else 4]


@dataclass(frozen=True)
class Targets:
    """Which destinations go to the proxy."""

    scope: str
    ports: frozenset[int]
    addresses: frozenset[str]

    @classmethod
    def build(cls, plan: RedirectPlan, addresses: TargetAddresses) -> Targets:
        every = {normalize(a) for a in (*addresses.v4, *addresses.v6)}
        return cls(plan.scope, frozenset(plan.ports), frozenset(every))

    def matches(self, server: Endpoint) -> bool:
        if server[1] not in self.ports:
            return False
        if self.scope == "all":
            return not ipaddress.ip_address(server[0]).is_loopback
        return server[0] in self.addresses

    def is_target(self, address: str) -> bool:
        return address in self.addresses


class Action(Enum):
    PASS = "pass"  # re-inject unchanged
    DROP = "drop"  # do not re-inject


Verdict = bytes | Action  # bytes: re-injected as they are, outbound, with our checksums


class Redirector:
    """The decisions, on each packet's bytes."""

    def __init__(
        self, proxy_port: int, targets: Targets, flows: Flows,
        exempt: Callable[[Endpoint], bool],
        direct: Callable[[Endpoint, Endpoint], bool] = lambda local, remote: False,
    ) -> None:
        self.proxy_port = proxy_port
        self.targets = targets  # replaced whole on update: readers see the old or the new one
        self.flows = flows
        self.exempt = exempt
        self.direct = direct  # whether a real socket has this local and remote address
        self.refused = 0  # SYNs dropped: their port was another client's

    def request(self, raw: bytes) -> Verdict:
        """Client -> server, to the proxy on loopback, when redirected."""
        packet = parse_tcp(raw)
        if packet is None:
            return Action.PASS
        lo = loopback_of(packet.src)
        key = (lo, packet.sport)
        if packet.is_syn:
            if not self.targets.matches(packet.server) or self.exempt(packet.client):
                if not self.flows.busy_with_another(key, packet.client):
                    self.flows.forget(key)  # a reused port must not inherit an old entry
                return Action.PASS
            if self.flows.busy_with_another(key, packet.client):
                self.refused += 1
                return Action.DROP
            self.flows.remember(key, Flow(packet.client, packet.server))
        elif self.flows.get(key, touch=True) != Flow(packet.client, packet.server):
            return Action.PASS  # a connection that started before us, or one we never took
        if packet.flags & TCP_RST:
            self.flows.forget(key)
        return rewrite(raw, src=key, dst=(lo, self.proxy_port))

    def reply(self, raw: bytes) -> Verdict:
        """Proxy -> client (LO:proxy -> LO:cp): made to come from the server, to the client."""
        packet = parse_tcp(raw)
        if packet is None or packet.sport != self.proxy_port or packet.src != packet.dst:
            return Action.PASS
        flow = self.flows.get(packet.server, touch=True)  # the reply's destination: (LO, cp)
        if flow is None or packet.src != loopback_of(flow.client[0]):
            return Action.PASS
        if packet.flags & TCP_RST:
            self.flows.forget(packet.server)
        return rewrite(raw, src=flow.server, dst=flow.client)

    def quic(self, raw: bytes) -> Verdict:
        """UDP/443 toward a target: dropped, so the client falls back to TCP."""
        version = raw[0] >> 4 if raw else 0
        if len(raw) < {4: 20, 6: 40}.get(version, 65536):  # no whole IP header: not ours to judge
            return Action.PASS
        dst = str(ipaddress.ip_address(raw[16:20] if version == 4 else raw[24:40]))
        return Action.DROP if self.targets.is_target(dst) else Action.PASS

    def flow_of(self, peer: Endpoint) -> Flow:
        """The redirected connection behind the proxy's peer (LO, cp); LookupError for a
        connection made straight to the listener (no entry, or a real socket at LO:cp)."""
        key = (normalize(peer[0]), int(peer[1]))
        flow = self.flows.get(key)
        if flow is None or self.direct(key, (key[0], self.proxy_port)):
            raise LookupError(f"{key[0]}:{key[1]} was not redirected by llmtap")
        return flow

    def original_addr(self, sock: Any) -> Endpoint:
        """mitmproxy's original_addr hook, answered from this process's memory."""
        return self.flow_of(sock.getpeername()[:2]).server
