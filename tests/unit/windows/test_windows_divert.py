"""WinDivert redirect: real IPv4/IPv6 packet bytes through a fake pydivert, checksums checked by
code written here, independently of the module's."""

from __future__ import annotations

import queue
from enum import IntEnum
from typing import Any

import pytest
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.base import RedirectPlan, TargetAddresses, plug_into_mitmproxy
from llmtap.platform.windows import packets, windivert
from llmtap.platform.windows.loopback import Action, Flow, Flows, Redirector, Targets
from llmtap.platform.windows.windivert import WindivertBackend
from win_packets import ACK, PSH, SYN, checksum, fields, ipv4, ipv6

CLIENT4, TARGET4, OTHER4 = "192.168.1.23", "160.79.104.10", "93.184.216.34"
CLIENT6, TARGET6 = "2a01:e0a:1d5:7c40:8d3:21f4:9a1b:3c2e", "2607:6bc0::10"
PLAN = RedirectPlan(proxy_port=8443, service_uid=0)
ADDRESSES = TargetAddresses(v4=frozenset({TARGET4}), v6=frozenset({TARGET6}))
PAYLOAD = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40))  # a ClientHello start


def test_the_builders_make_valid_packets() -> None:
    for raw in (ipv4(CLIENT4, TARGET4, 52431, 443, SYN), ipv6(CLIENT6, TARGET6, 52432, 443, ACK,
                                                              PAYLOAD)):
        fields(raw)
    broken = bytearray(ipv4(CLIENT4, TARGET4, 52431, 443, ACK, PAYLOAD))
    broken[-1] ^= 0xFF
    with pytest.raises(AssertionError, match="TCP checksum"):
        fields(bytes(broken))


# --- pure rewriting -------------------------------------------------------------------------------


def test_internet_checksum_matches_rfc1071_example() -> None:
    # RFC 1071 section 3's example words sum to ddf2 (folded); the checksum is its complement.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert packets.internet_checksum(data) == 0xFFFF - 0xDDF2
    assert packets.internet_checksum(data) == checksum(data)


def test_parse_ipv4_and_ipv6() -> None:
    p4 = packets.parse_tcp(ipv4(CLIENT4, TARGET4, 52431, 443, SYN))
    assert p4 is not None and p4.is_syn
    assert (p4.version, p4.tcp_offset, p4.client, p4.server) == (
        4, 20, (CLIENT4, 52431), (TARGET4, 443))
    p6 = packets.parse_tcp(ipv6(CLIENT6, TARGET6, 52432, 443, ACK | PSH, PAYLOAD))
    assert p6 is not None and not p6.is_syn
    assert (p6.version, p6.tcp_offset, p6.client, p6.server) == (
        6, 40, (CLIENT6, 52432), (TARGET6, 443))


@pytest.mark.parametrize("raw", [
    ipv4(CLIENT4, TARGET4, 5353, 443, 0, b"quic", proto=17),  # UDP
    ipv6(CLIENT6, TARGET6, 52432, 443, SYN, next_header=0),  # hop-by-hop extension header
    b"\x45\x00",
    b"",
])
def test_parse_ignores_what_it_does_not_rewrite(raw: bytes) -> None:
    assert packets.parse_tcp(raw) is None


def test_parse_ignores_fragments() -> None:
    raw = bytearray(ipv4(CLIENT4, TARGET4, 52431, 443, ACK, PAYLOAD))
    raw[6:8] = (0x2000).to_bytes(2, "big")  # more fragments
    assert packets.parse_tcp(bytes(raw)) is None


def test_rewrite_ipv4_destination() -> None:
    before = ipv4(CLIENT4, TARGET4, 52431, 443, ACK | PSH, PAYLOAD)
    after = packets.rewrite(before, dst=(CLIENT4, 8443))
    old, new = fields(before), fields(after)
    assert new["src"] == (CLIENT4, 52431)
    assert new["dst"] == (CLIENT4, 8443)
    assert len(after) == len(before)
    for key in ("payload", "seq", "flags", "ttl", "ident"):
        assert new[key] == old[key], key


def test_rewrite_ipv6_source_and_destination() -> None:
    before = ipv6(CLIENT6, CLIENT6, 8443, 52432, SYN | ACK)
    after = packets.rewrite(before, src=(TARGET6, 443), dst=(CLIENT6, 52432))
    new = fields(after)
    assert new["src"] == (TARGET6, 443)
    assert new["dst"] == (CLIENT6, 52432)
    assert new["options"] == fields(before)["options"]
    assert new["flow"] == fields(before)["flow"]


def test_rewrite_refuses_a_mixed_family() -> None:
    with pytest.raises(ValueError, match="not an IPv4 address"):
        packets.rewrite(ipv4(CLIENT4, TARGET4, 1, 443, SYN), dst=(TARGET6, 443))


def test_rewrite_odd_length_payload() -> None:
    after = packets.rewrite(ipv4(CLIENT4, TARGET4, 52431, 443, ACK, b"abc"), dst=(CLIENT4, 8443))
    assert fields(after)["payload"] == b"abc"


# --- decisions --------------------------------------------------------------------------------


def redirector(scope: str = "targets", exempt: set[tuple[str, int]] | None = None) -> Redirector:
    plan = RedirectPlan(proxy_port=8443, service_uid=0, scope=scope)
    return Redirector(8443, Targets.build(plan, ADDRESSES), Flows(),
                      lambda client: client in (exempt or set()))


def test_a_connection_to_a_target_goes_to_the_proxy_on_loopback_and_back() -> None:
    r = redirector()
    syn = r.request(ipv4(CLIENT4, TARGET4, 52431, 443, SYN))
    assert isinstance(syn, bytes)
    assert (fields(syn)["src"], fields(syn)["dst"]) == (("127.0.0.1", 52431), ("127.0.0.1", 8443))
    assert r.flows.get(("127.0.0.1", 52431)) == Flow((CLIENT4, 52431), (TARGET4, 443))
    synack = r.reply(ipv4("127.0.0.1", "127.0.0.1", 8443, 52431, SYN | ACK))
    assert isinstance(synack, bytes)
    assert (fields(synack)["src"], fields(synack)["dst"]) == ((TARGET4, 443), (CLIENT4, 52431))
    data = r.request(ipv4(CLIENT4, TARGET4, 52431, 443, ACK | PSH, PAYLOAD))
    assert isinstance(data, bytes) and fields(data)["payload"] == PAYLOAD
    assert fields(data)["dst"] == ("127.0.0.1", 8443)


def test_ipv6_connection() -> None:
    r = redirector()
    syn = r.request(ipv6(CLIENT6, TARGET6, 52432, 443, SYN))
    assert isinstance(syn, bytes) and fields(syn)["dst"] == ("::1", 8443)
    assert fields(syn)["src"] == ("::1", 52432)
    back = r.reply(ipv6("::1", "::1", 8443, 52432, SYN | ACK))
    assert isinstance(back, bytes)
    assert (fields(back)["src"], fields(back)["dst"]) == ((TARGET6, 443), (CLIENT6, 52432))


def test_what_stays_untouched() -> None:
    r = redirector(exempt={(CLIENT4, 50000)})
    assert r.request(ipv4(CLIENT4, OTHER4, 52431, 443, SYN)) is Action.PASS  # not a target
    assert r.request(ipv4(CLIENT4, TARGET4, 52431, 80, SYN)) is Action.PASS  # not a port of ours
    assert r.request(ipv4(CLIENT4, TARGET4, 52440, 443, ACK, PAYLOAD)) is Action.PASS  # older
    assert r.request(ipv4(CLIENT4, TARGET4, 50000, 443, SYN)) is Action.PASS  # the proxy itself
    assert r.reply(ipv4("127.0.0.1", "127.0.0.1", 8443, 61000, ACK)) is Action.PASS  # unknown
    assert r.reply(ipv4("127.0.0.1", "127.0.0.1", 9000, 52431, ACK)) is Action.PASS
    assert r.request(b"\x60" + bytes(10)) is Action.PASS
    assert len(r.flows) == 0


def test_the_proxys_own_connection_clears_a_stale_entry() -> None:
    r = redirector(exempt={(CLIENT4, 52431)})
    r.flows.remember(("127.0.0.1", 52431), Flow((CLIENT4, 52431), (TARGET4, 443)))  # earlier
    assert r.request(ipv4(CLIENT4, TARGET4, 52431, 443, SYN)) is Action.PASS
    assert r.request(ipv4(CLIENT4, TARGET4, 52431, 443, ACK)) is Action.PASS


def test_scope_all_takes_everything_but_loopback() -> None:
    r = redirector(scope="all")
    assert isinstance(r.request(ipv4(CLIENT4, OTHER4, 52431, 443, SYN)), bytes)
    assert r.request(ipv4("127.0.0.1", "127.0.0.1", 52432, 443, SYN)) is Action.PASS
    assert r.request(ipv6("::1", "::1", 52433, 443, SYN)) is Action.PASS


def test_quic_to_targets_is_dropped() -> None:
    r = redirector()
    assert r.quic(ipv4(CLIENT4, TARGET4, 5353, 443, 0, b"q", proto=17)) is Action.DROP
    assert r.quic(ipv4(CLIENT4, OTHER4, 5353, 443, 0, b"q", proto=17)) is Action.PASS


def test_table_is_a_bounded_lru() -> None:
    table = Flows(capacity=2)
    flow = Flow(("10.0.0.1", 1), ("1.1.1.1", 443))
    table.remember(("127.0.0.1", 1), flow)
    table.remember(("127.0.0.1", 2), flow)
    table.get(("127.0.0.1", 1))
    table.remember(("127.0.0.1", 1), flow)  # refreshed
    table.remember(("127.0.0.1", 3), flow)
    assert table.get(("127.0.0.1", 2)) is None
    assert table.get(("127.0.0.1", 1)) == flow


class FakeSocket:
    def __init__(self, peer: tuple[Any, ...]) -> None:
        self.peer = peer

    def getpeername(self) -> tuple[Any, ...]:
        return self.peer


@pytest.mark.parametrize("peer", [
    ("::ffff:127.0.0.1", 52431, 0, 0),  # a dual-stack listener's view of an IPv4 client
    ("127.0.0.1", 52431),
])
def test_original_addr_normalizes_the_peer(peer: tuple[Any, ...]) -> None:
    r = redirector()
    r.request(ipv4(CLIENT4, TARGET4, 52431, 443, SYN))
    assert r.original_addr(FakeSocket(peer)) == (TARGET4, 443)


def test_original_addr_of_an_unknown_peer_fails() -> None:
    r = redirector()
    r.request(ipv6(CLIENT6, TARGET6, 52432, 443, SYN))
    assert r.original_addr(FakeSocket(("::1%1", 52432, 0, 1))) == (TARGET6, 443)
    with pytest.raises(LookupError, match="not redirected"):
        r.original_addr(FakeSocket(("127.0.0.1", 1)))


# --- filters (golden) --------------------------------------------------------------------------


def test_filters_are_golden() -> None:
    addrs = [*ADDRESSES.v4, *ADDRESSES.v6]
    assert windivert.render_request_filter(PLAN, addrs) == (
        "outbound and tcp and tcp.DstPort == 443 and "
        "(ip.DstAddr == 160.79.104.10 or ipv6.DstAddr == 2607:6bc0::10)"
    )
    assert windivert.render_reply_filter(PLAN) == (
        "outbound and tcp and tcp.SrcPort == 8443 and (ip.SrcAddr == 127.0.0.1 or ipv6.SrcAddr == ::1)")
    assert windivert.render_quic_filter(PLAN, addrs) == (
        "outbound and udp and udp.DstPort == 443 and "
        "(ip.DstAddr == 160.79.104.10 or ipv6.DstAddr == 2607:6bc0::10)"
    )
    every = RedirectPlan(8443, 0, ports=(443, 8443), scope="all")
    assert windivert.render_request_filter(every, []) == (
        "outbound and tcp and (tcp.DstPort == 443 or tcp.DstPort == 8443) and "
        "(ipv6 or ip.DstAddr < 127.0.0.0 or ip.DstAddr > 127.255.255.255) and "
        "(ip or ipv6.DstAddr != ::1)"
    )


def test_filters_without_or_with_many_addresses() -> None:
    assert windivert.render_request_filter(PLAN, []) is None
    assert windivert.render_quic_filter(PLAN, []) is None
    assert windivert.render_quic_filter(RedirectPlan(8443, 0, block_quic=False), [TARGET4]) is None
    many = [f"10.1.{i // 256}.{i % 256}" for i in range(windivert.MAX_FILTER_ADDRESSES + 1)]
    assert windivert.render_request_filter(PLAN, many) == "outbound and tcp and tcp.DstPort == 443"


# --- the handle loop, through a fake pydivert ------------------------------------------------------


class FakePacket:
    """pydivert.Packet's shape: raw is a writable memoryview, direction and interface plain."""

    def __init__(self, raw: bytes, direction: int = 0) -> None:
        self.raw = memoryview(bytearray(raw))
        self.direction = direction
        self.interface = (7, 0)


class FakeHandle:
    def __init__(self, module: FakeDivert, filter_: str) -> None:
        self.module = module
        self.filter = filter_
        self.inbox: queue.Queue[FakePacket | None] = queue.Queue()
        self.sent: queue.Queue[tuple[bytes, int, bool]] = queue.Queue()
        self.closed = False

    def open(self) -> None:
        self.module.events.append(("open", self.filter))
        if self.module.refuse:
            raise OSError(5, "Access is denied")

    def recv(self) -> FakePacket:
        packet = self.inbox.get()
        if packet is None:
            raise OSError(995, "The I/O operation has been aborted")
        return packet

    def send(self, packet: FakePacket, recalculate_checksum: bool = True) -> None:
        self.sent.put((bytes(packet.raw), packet.direction, recalculate_checksum))

    def close(self) -> None:
        self.module.events.append(("close", self.filter))
        self.closed = True
        self.inbox.put(None)

    def divert(self, raw: bytes) -> tuple[bytes, int, bool]:
        """Hands the handle one captured outbound packet; returns what it re-injected."""
        self.inbox.put(FakePacket(raw))
        return self.sent.get(timeout=5)


class FakeDivert:
    class Direction(IntEnum):
        OUTBOUND = 0
        INBOUND = 1

    def __init__(self) -> None:
        self.handles: list[FakeHandle] = []
        self.events: list[tuple[str, str]] = []
        self.refuse = False

    def WinDivert(self, filter_: str) -> FakeHandle:
        handle = FakeHandle(self, filter_)
        self.handles.append(handle)
        return handle

    def open_handle(self, fragment: str) -> FakeHandle:
        (handle,) = [h for h in self.handles if fragment in h.filter and not h.closed]
        return handle


@pytest.fixture
def fake() -> FakeDivert:
    return FakeDivert()


@pytest.fixture
def backend(fake: FakeDivert) -> Any:
    tap = WindivertBackend(PLAN, divert=fake, exempt=lambda c: c == (CLIENT4, 50000),
                           elevated=lambda: True)
    tap.install(ADDRESSES)
    yield tap
    tap.remove()


def test_install_opens_replies_requests_and_quic(fake: FakeDivert, backend: Any) -> None:
    assert [h.filter for h in fake.handles] == [
        windivert.render_reply_filter(PLAN),
        windivert.render_request_filter(PLAN, [TARGET4, TARGET6]),
        windivert.render_quic_filter(PLAN, [TARGET4, TARGET6]),
    ]
    assert backend.alive()


def test_round_trip_ipv4(fake: FakeDivert, backend: Any) -> None:
    raw, direction, recalculate = fake.open_handle("tcp.DstPort").divert(
        ipv4(CLIENT4, TARGET4, 52431, 443, SYN))
    assert direction == FakeDivert.Direction.OUTBOUND  # loopback packets are outbound
    assert recalculate is False  # our checksums, verified here
    assert (fields(raw)["src"], fields(raw)["dst"]) == (("127.0.0.1", 52431), ("127.0.0.1", 8443))
    lookup = backend.original_addr_lookup()
    assert lookup(FakeSocket(("127.0.0.1", 52431))) == (TARGET4, 443)
    raw, direction, recalculate = fake.open_handle("tcp.SrcPort").divert(
        ipv4("127.0.0.1", "127.0.0.1", 8443, 52431, SYN | ACK))
    assert direction == FakeDivert.Direction.OUTBOUND
    assert (fields(raw)["src"], fields(raw)["dst"]) == ((TARGET4, 443), (CLIENT4, 52431))
    raw, _, _ = fake.open_handle("tcp.DstPort").divert(
        ipv4(CLIENT4, TARGET4, 52431, 443, ACK | PSH, PAYLOAD))
    assert fields(raw)["payload"] == PAYLOAD and fields(raw)["dst"] == ("127.0.0.1", 8443)


def test_round_trip_ipv6(fake: FakeDivert, backend: Any) -> None:
    raw, direction, _ = fake.open_handle("tcp.DstPort").divert(ipv6(CLIENT6, TARGET6, 52432, 443, SYN))
    assert direction == FakeDivert.Direction.OUTBOUND
    assert fields(raw)["dst"] == ("::1", 8443)
    assert backend.original_addr_lookup()(FakeSocket(("::1", 52432, 0, 0))) == (TARGET6, 443)
    raw, _, _ = fake.open_handle("tcp.SrcPort").divert(ipv6("::1", "::1", 8443, 52432, SYN | ACK))
    assert fields(raw)["src"] == (TARGET6, 443)


def test_the_proxys_own_connections_pass_unchanged(fake: FakeDivert, backend: Any) -> None:
    own = ipv4(CLIENT4, TARGET4, 50000, 443, SYN)
    raw, direction, recalculate = fake.open_handle("tcp.DstPort").divert(own)
    assert (raw, direction, recalculate) == (own, FakeDivert.Direction.OUTBOUND, True)


def test_undecodable_packets_pass(fake: FakeDivert, backend: Any) -> None:
    junk = b"\x45" + bytes(30)
    assert fake.open_handle("tcp.DstPort").divert(junk)[0] == junk
    assert backend.alive()


def test_quic_is_dropped(fake: FakeDivert, backend: Any) -> None:
    quic = fake.open_handle("udp.DstPort")
    quic.inbox.put(FakePacket(ipv4(CLIENT4, TARGET4, 5353, 443, 0, b"q", proto=17)))
    other = ipv4(CLIENT4, OTHER4, 5353, 443, 0, b"q", proto=17)
    assert quic.divert(other)[0] == other  # the one before it was dropped: this comes first


def test_update_opens_new_handles_before_closing_old_ones(fake: FakeDivert, backend: Any) -> None:
    fake.events.clear()
    backend.update_targets(TargetAddresses(v4=frozenset({OTHER4})))
    kinds = [kind for kind, _ in fake.events]
    assert kinds == ["open", "open", "close", "close"]
    request_filter = fake.events[0][1]
    # the dropped targets stay one more round for connections still open
    assert all(a in request_filter for a in (OTHER4, TARGET4, TARGET6))
    assert TARGET4 not in fake.events[1][1]  # QUIC blocking follows the current set at once
    raw, _, _ = fake.open_handle("tcp.DstPort").divert(ipv4(CLIENT4, OTHER4, 52500, 443, SYN))
    assert fields(raw)["dst"] == ("127.0.0.1", 8443)
    assert backend.alive()


def test_remove_closes_every_handle(fake: FakeDivert, backend: Any) -> None:
    backend.remove()
    assert all(h.closed for h in fake.handles)
    assert not backend.alive()
    backend.remove()  # safe twice


def test_a_dead_handle_is_noticed(fake: FakeDivert, backend: Any) -> None:
    requests = fake.open_handle("tcp.DstPort")
    loop = backend._per_target[0]
    requests.inbox.put(None)  # recv fails while nobody is closing it
    loop._thread.join(timeout=5)
    assert not backend.alive()


def test_not_elevated_is_a_clear_usage_error(fake: FakeDivert) -> None:
    tap = WindivertBackend(PLAN, divert=fake, elevated=lambda: False)
    with pytest.raises(UsageError, match="needs Administrator rights"):
        tap.install(ADDRESSES)
    assert fake.handles == []


def test_a_refused_handle_leaves_nothing_open(fake: FakeDivert) -> None:
    fake.refuse = True
    tap = WindivertBackend(PLAN, divert=fake, elevated=lambda: True)
    with pytest.raises(RuntimeFailure, match="WinDivert refused replies"):
        tap.install(ADDRESSES)
    assert not tap.alive()


def test_without_pydivert_the_error_says_what_to_install() -> None:
    tap = WindivertBackend(PLAN, elevated=lambda: True)
    with pytest.raises(UsageError, match=r"pip install 'pydivert>=2.0.3,<=2.1.0'"):
        tap.install(ADDRESSES)


def test_nothing_outlives_the_process() -> None:
    assert WindivertBackend.dies_with_owner is True
    assert WindivertBackend.rules_present() is False
    assert WindivertBackend.cleanup_leftovers() is False
    assert WindivertBackend.available() is False  # not Windows


def test_chosen_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtap import redirect

    monkeypatch.setattr("sys.platform", "win32")
    assert redirect.backends_for_this_os() == [WindivertBackend]
    with pytest.raises(UsageError, match="pydivert"):
        redirect.choose_backend("windivert")  # not available here: the hint names the package


def test_exemption_by_process_id() -> None:
    owners = {(CLIENT4, 50000): 4242, (CLIENT4, 52431): 777}
    exempt = windivert.OwnProcessExemption(pids=[4242], owner_of=owners.get)
    assert exempt((CLIENT4, 50000)) is True
    assert exempt((CLIENT4, 52431)) is False
    assert exempt((CLIENT4, 1)) is False


def test_plugs_into_mitmproxy_instead_of_its_windows_redirector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mitmproxy import platform as mitmproxy_platform

    monkeypatch.setattr(mitmproxy_platform, "original_addr", mitmproxy_platform.original_addr)
    own_init = mitmproxy_platform.init_transparent_mode
    monkeypatch.setattr(mitmproxy_platform, "init_transparent_mode", own_init)
    r = redirector()
    plug_into_mitmproxy(r.original_addr)
    assert mitmproxy_platform.original_addr == r.original_addr
    assert mitmproxy_platform.init_transparent_mode is not own_init
    mitmproxy_platform.init_transparent_mode()  # starts nothing of mitmproxy's
