"""Windows redirect: WinDivert (through pydivert) rewrites packets to and from the local proxy.

A client's outbound TCP packet to a target, `C:cp -> T:443`, is diverted, recorded as
`(C, cp) -> (T, 443)` in an in-process table and re-injected inbound as `C:cp -> C:proxy_port`
(WinDivert cannot inject toward 127.0.0.1, so the packet goes to the client's own address). The
proxy's replies, `C:proxy_port -> C:cp`, are diverted and rewritten to come from `T:443`. The proxy
asks the same table for the original destination (`original_addr`): no local API, no other
process. The proxy's own connections are told apart by the owning process id of their first
packet. WinDivert removes a handle's filter when the handle closes, also when the process is
killed, so no redirect outlives it.

Rewriting is pure functions on the raw IPv4/IPv6 bytes with full checksum recomputation; the
handle loop only moves bytes, so tests drive it with a fake pydivert.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import ipaddress
import logging
import os
import struct
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.base import OriginalAddrLookup, RedirectBackend, RedirectPlan, TargetAddresses
from llmtap.platform.windows.elevation import ElevationCheck, is_elevated, require_elevated

log = logging.getLogger("llmtap.windivert")

Endpoint = tuple[str, int]

IPPROTO_TCP = 6
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
QUIC_PORT = 443
TABLE_CAPACITY = 65536
# WinDivert filters are limited in size: beyond this many addresses the filter matches the ports
# only and the address check happens here.
MAX_FILTER_ADDRESSES = 64
PYDIVERT_REQUIREMENT = "pydivert>=2.0.3,<=2.1.0"  # mitmproxy's own pin on Windows


# --- packet bytes (pure) -------------------------------------------------------------------------


def internet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass(frozen=True)
class TcpPacket:
    """Where the fields are in one IPv4 or IPv6 packet that carries TCP."""

    version: int
    tcp_offset: int  # = the IP header's length
    end: int  # the IP packet's length per its header
    src: str
    dst: str
    sport: int
    dport: int
    flags: int

    @property
    def client(self) -> Endpoint:
        return self.src, self.sport

    @property
    def server(self) -> Endpoint:
        return self.dst, self.dport

    @property
    def is_syn(self) -> bool:
        """The first packet of a connection (SYN without ACK)."""
        return bool(self.flags & TCP_SYN) and not self.flags & TCP_ACK


def parse_tcp(raw: bytes) -> TcpPacket | None:
    """None for anything but an unfragmented TCP packet (IPv6 extension headers included)."""
    if len(raw) < 20:
        return None
    version = raw[0] >> 4
    if version == 4:
        offset = (raw[0] & 0x0F) * 4
        fragment = struct.unpack_from("!H", raw, 6)[0] & 0x3FFF  # MF flag or an offset
        if raw[9] != IPPROTO_TCP or fragment or offset < 20:
            return None
        end = struct.unpack_from("!H", raw, 2)[0]
        src, dst = raw[12:16], raw[16:20]
    elif version == 6:
        offset = 40
        if len(raw) < 40 or raw[6] != IPPROTO_TCP:
            return None
        end = 40 + struct.unpack_from("!H", raw, 4)[0]
        src, dst = raw[8:24], raw[24:40]
    else:
        return None
    if len(raw) < offset + 20 or end > len(raw):
        return None
    sport, dport = struct.unpack_from("!HH", raw, offset)
    return TcpPacket(
        version, offset, end, str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)),
        sport, dport, raw[offset + 13],
    )


def rewrite(raw: bytes, src: Endpoint | None = None, dst: Endpoint | None = None) -> bytes:
    """The packet with a new source and/or destination, IPv4 and TCP checksums recomputed."""
    packet = parse_tcp(raw)
    if packet is None:
        raise ValueError("not a TCP packet")
    buf = bytearray(raw)
    width = 4 if packet.version == 4 else 16
    src_at, dst_at = (12, 16) if packet.version == 4 else (8, 24)
    for endpoint, addr_at, port_at in ((src, src_at, 0), (dst, dst_at, 2)):
        if endpoint is None:
            continue
        packed = ipaddress.ip_address(endpoint[0]).packed
        if len(packed) != width:
            raise ValueError(f"{endpoint[0]} is not an IPv{packet.version} address")
        buf[addr_at:addr_at + width] = packed
        struct.pack_into("!H", buf, packet.tcp_offset + port_at, endpoint[1])
    if packet.version == 4:
        struct.pack_into("!H", buf, 10, 0)
        struct.pack_into("!H", buf, 10, internet_checksum(bytes(buf[:packet.tcp_offset])))
    struct.pack_into("!H", buf, packet.tcp_offset + 16, tcp_checksum(bytes(buf), packet))
    return bytes(buf)


def tcp_checksum(buf: bytes, packet: TcpPacket) -> int:
    """Over the pseudo-header and the segment, with the checksum field taken as zero."""
    segment = bytearray(buf[packet.tcp_offset:packet.end])
    segment[16:18] = b"\0\0"
    if packet.version == 4:
        pseudo = buf[12:20] + struct.pack("!BBH", 0, IPPROTO_TCP, len(segment))
    else:
        pseudo = buf[8:40] + struct.pack("!I3xB", len(segment), IPPROTO_TCP)
    return internet_checksum(pseudo + bytes(segment))


def normalize(address: str) -> str:
    """`::ffff:1.2.3.4` -> `1.2.3.4`; scope ids dropped; the canonical text form."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


# --- the decisions (pure but for the table) -------------------------------------------------------


class OriginalDestinations:
    """client (ip, port) -> the (ip, port) it connected to; a thread-safe bounded LRU."""

    def __init__(self, capacity: int = TABLE_CAPACITY) -> None:
        self.capacity = capacity
        self._map: collections.OrderedDict[Endpoint, Endpoint] = collections.OrderedDict()
        self._lock = threading.Lock()

    def remember(self, client: Endpoint, server: Endpoint) -> None:
        with self._lock:
            self._map[client] = server
            self._map.move_to_end(client)
            while len(self._map) > self.capacity:
                self._map.popitem(last=False)

    def get(self, client: Endpoint) -> Endpoint | None:
        with self._lock:
            return self._map.get(client)

    def forget(self, client: Endpoint) -> None:
        with self._lock:
            self._map.pop(client, None)

    def __len__(self) -> int:
        return len(self._map)

    def original_addr(self, sock: Any) -> Endpoint:
        """mitmproxy's original_addr hook, answered from this process's memory."""
        peer = sock.getpeername()
        client = (normalize(peer[0]), int(peer[1]))
        server = self.get(client)
        if server is None:
            raise LookupError(f"{client[0]}:{client[1]} was not redirected by llmtap")
        return server


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


Verdict = bytes | Action


class Redirector:
    """What happens to each diverted packet, decided on its bytes."""

    def __init__(
        self, proxy_port: int, targets: Targets, table: OriginalDestinations,
        exempt: Callable[[Endpoint], bool],
    ) -> None:
        self.proxy_port = proxy_port
        self.targets = targets  # replaced whole on update: readers see the old or the new one
        self.table = table
        self.exempt = exempt

    def request(self, raw: bytes) -> Verdict:
        """Client -> server: to the proxy, at the client's own address, when redirected."""
        packet = parse_tcp(raw)
        if packet is None:
            return Action.PASS
        if packet.is_syn:
            if not self.targets.matches(packet.server) or self.exempt(packet.client):
                self.table.forget(packet.client)  # a reused port must not inherit an old entry
                return Action.PASS
            self.table.remember(packet.client, packet.server)
        elif self.table.get(packet.client) != packet.server:
            return Action.PASS  # a connection that started before us, or one we never took
        return rewrite(raw, dst=(packet.src, self.proxy_port))

    def reply(self, raw: bytes) -> Verdict:
        """Proxy -> client: made to come from the server the client believes it talks to."""
        packet = parse_tcp(raw)
        if packet is None or packet.sport != self.proxy_port:
            return Action.PASS
        server = self.table.get(packet.server)  # the reply's destination is the client
        if server is None:
            return Action.PASS
        return rewrite(raw, src=server)

    def quic(self, raw: bytes) -> Verdict:
        """UDP/443 toward a target: dropped, so the client falls back to TCP."""
        version = raw[0] >> 4 if raw else 0
        if version not in (4, 6):
            return Action.PASS
        dst = str(ipaddress.ip_address(raw[16:20] if version == 4 else raw[24:40]))
        return Action.DROP if self.targets.is_target(dst) else Action.PASS


class OwnProcessExemption:
    """The loop guard: connections whose first packet comes from the proxy's own process."""

    def __init__(
        self, pids: Iterable[int] = (), owner_of: Callable[[Endpoint], int | None] | None = None
    ) -> None:
        self.pids = frozenset(pids) or frozenset({os.getpid()})
        self.owner_of = owner_of or tcp_owner

    def __call__(self, client: Endpoint) -> bool:
        return self.owner_of(client) in self.pids


def tcp_owner(local: Endpoint) -> int | None:
    """The pid owning the TCP socket bound to `local` (GetExtendedTcpTable, through psutil)."""
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == local[1] and normalize(conn.laddr.ip) == local[0]:
            return int(conn.pid) if conn.pid is not None else None
    return None


# --- WinDivert filters (pure, golden-tested) ------------------------------------------------------


def _any_of(tests: Iterable[str]) -> str:
    items = list(tests)
    return items[0] if len(items) == 1 else "(" + " or ".join(items) + ")"


def _by_family_then_value(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


def _address_test(addresses: Iterable[str]) -> str:
    ordered = sorted({normalize(a) for a in addresses}, key=_by_family_then_value)
    return _any_of(
        f"{'ip' if ipaddress.ip_address(a).version == 4 else 'ipv6'}.DstAddr == {a}"
        for a in ordered
    )


def render_request_filter(plan: RedirectPlan, addresses: Iterable[str]) -> str | None:
    """Outbound TCP to the targets' ports (and addresses); None when there is nothing to take."""
    base = "outbound and tcp and " + _any_of(f"tcp.DstPort == {p}" for p in plan.ports)
    if plan.scope == "all":
        # A test on a field the packet lacks is false: guard each family's exclusion.
        return (
            f"{base} and (ipv6 or ip.DstAddr < 127.0.0.0 or ip.DstAddr > 127.255.255.255)"
            " and (ip or ipv6.DstAddr != ::1)"
        )
    wanted = set(addresses)
    if not wanted:
        return None
    if len(wanted) > MAX_FILTER_ADDRESSES:
        return base
    return f"{base} and {_address_test(wanted)}"


def render_reply_filter(plan: RedirectPlan) -> str:
    return f"outbound and tcp and tcp.SrcPort == {plan.proxy_port}"


def render_quic_filter(plan: RedirectPlan, addresses: Iterable[str]) -> str | None:
    wanted = set(addresses)
    if not plan.block_quic or not wanted:
        return None
    base = f"outbound and udp and udp.DstPort == {QUIC_PORT}"
    return base if len(wanted) > MAX_FILTER_ADDRESSES else f"{base} and {_address_test(wanted)}"


# --- the handle loop ---------------------------------------------------------------------------


class DivertLoop:
    """One WinDivert handle and the thread that pumps its packets through `handler`.

    `divert` is the pydivert module (or a fake with the same WinDivert/Direction shape).
    """

    def __init__(
        self, divert: Any, filter_: str, handler: Callable[[bytes], Verdict],
        inject_inbound: bool, name: str,
    ) -> None:
        self.divert = divert
        self.filter = filter_
        self.handler = handler
        self.inject_inbound = inject_inbound
        self.name = name
        self.failure: str | None = None
        self._closing = threading.Event()
        self._handle: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        handle = self.divert.WinDivert(self.filter)
        try:
            handle.open()
        except OSError as exc:
            raise RuntimeFailure(f"WinDivert refused {self.name} ({self.filter}): {exc}") from None
        self._handle = handle
        self._thread = threading.Thread(target=self._run, name=f"llmtap-{self.name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Closing the handle ends recv() in the thread (ERROR_OPERATION_ABORTED)."""
        self._closing.set()
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError as exc:
                log.debug("closing the %s handle: %s", self.name, exc)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    def _run(self) -> None:
        while True:
            try:
                packet = self._handle.recv()
            except OSError as exc:
                if not self._closing.is_set():
                    self.failure = str(exc)
                    log.error("WinDivert %s stopped: %s", self.name, exc)
                return
            try:
                self._forward(packet)
            except OSError as exc:
                if self._closing.is_set():
                    return
                log.warning("WinDivert %s could not re-inject a packet: %s", self.name, exc)

    def _forward(self, packet: Any) -> None:
        try:
            verdict = self.handler(bytes(packet.raw))
        except Exception as exc:  # one odd packet must never stop the redirect
            log.warning("WinDivert %s passed a packet it could not handle: %s", self.name, exc)
            verdict = Action.PASS
        if verdict is Action.DROP:
            return
        if verdict is Action.PASS:
            # Outbound checksums may still be left to the NIC (offload): let WinDivert fill them.
            self._handle.send(packet)
            return
        assert isinstance(verdict, bytes)
        packet.raw[:] = verdict  # same length: only addresses, ports and checksums changed
        if self.inject_inbound:
            packet.direction = self.divert.Direction.INBOUND
        self._handle.send(packet, recalculate_checksum=False)


# --- the backend ---------------------------------------------------------------------------------


class WindivertBackend(RedirectBackend):
    name = "windivert"
    dies_with_owner = True  # the driver drops a handle's filter when its process ends

    def __init__(
        self, plan: RedirectPlan, *, divert: Any = None,
        exempt: Callable[[Endpoint], bool] | None = None, elevated: ElevationCheck = is_elevated,
    ) -> None:
        super().__init__(plan)
        self._divert = divert
        self._elevated = elevated
        self.table = OriginalDestinations()
        self.redirector = Redirector(
            plan.proxy_port, Targets.build(plan, TargetAddresses()), self.table,
            exempt or OwnProcessExemption(),
        )
        self._reply: DivertLoop | None = None
        self._per_target: list[DivertLoop] = []
        self._filtered: frozenset[str] = frozenset()

    @classmethod
    def available(cls) -> bool:
        return sys.platform == "win32" and importlib.util.find_spec("pydivert") is not None

    def install(self, addresses: TargetAddresses) -> None:
        require_elevated("intercepting with WinDivert", self._elevated)
        if self._divert is None:
            self._divert = _import_pydivert()
        try:
            self._reply = self._loop(render_reply_filter(self.plan), self.redirector.reply,
                                     inbound=False, name="replies")
            self.update_targets(addresses)
        except BaseException:
            self.remove()
            raise

    def update_targets(self, addresses: TargetAddresses) -> None:
        """New handles first, then the old ones closed: no moment without a redirect."""
        if self._reply is None:
            raise RuntimeFailure("the redirect is not installed")
        self.redirector.targets = Targets.build(self.plan, addresses)
        current = self.redirector.targets.addresses
        # Addresses just dropped stay in the filter one more round, for connections still open.
        filtered = current | self._filtered
        loops = []
        try:
            for filter_, handler, inbound, name in (
                (render_request_filter(self.plan, filtered), self.redirector.request, True,
                 "requests"),
                (render_quic_filter(self.plan, current), self.redirector.quic, False, "quic"),
            ):
                if filter_ is not None:
                    loops.append(self._loop(filter_, handler, inbound, name))
        except BaseException:
            for loop in loops:
                loop.close()
            raise
        old, self._per_target, self._filtered = self._per_target, loops, current
        for loop in old:
            loop.close()

    def remove(self) -> None:
        for loop in [*self._per_target, *([self._reply] if self._reply else [])]:
            loop.close()
        self._per_target = []
        self._reply = None

    def alive(self) -> bool:
        loops = [*self._per_target, *([self._reply] if self._reply else [])]
        return bool(loops) and all(loop.alive() for loop in loops)

    def original_addr_lookup(self) -> OriginalAddrLookup:
        return self.table.original_addr

    @classmethod
    def rules_present(cls) -> bool:
        return False  # a WinDivert filter exists only while its handle is open in a live process

    @classmethod
    def cleanup_leftovers(cls) -> bool:
        return False  # nothing can be left behind: see rules_present

    def _loop(
        self, filter_: str, handler: Callable[[bytes], Verdict], inbound: bool, name: str
    ) -> DivertLoop:
        loop = DivertLoop(self._divert, filter_, handler, inbound, name)
        loop.start()
        return loop


def _import_pydivert() -> Any:
    try:
        return importlib.import_module("pydivert")
    except ImportError:
        raise UsageError(
            f"redirect.backend = 'windivert' needs pydivert: pip install '{PYDIVERT_REQUIREMENT}'"
        ) from None
