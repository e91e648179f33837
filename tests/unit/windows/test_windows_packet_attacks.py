"""Malformed packets at the Windows redirector: truncated, corrupted, lying about their length.
None may raise (each one would cost a log line and slip through un-judged) or come back rewritten
at another length or over bytes that are not its TCP header."""

from __future__ import annotations

import random
import struct

import pytest
from llmtap.platform.windows import packets
from llmtap.platform.windows.loopback import Action
from test_windows_loopback import CLIENT4, CLIENT6, TARGET4, TARGET6, redirector
from win_packets import ACK, PSH, SYN, ipv4, ipv6


def samples() -> list[bytes]:
    return [ipv4(CLIENT4, TARGET4, 50000, 443, SYN), ipv4(CLIENT4, TARGET4, 50000, 443, ACK | PSH, b"hi"),
            ipv6(CLIENT6, TARGET6, 50001, 443, SYN), ipv6(CLIENT6, TARGET6, 50001, 443, ACK, b"x" * 9),
            ipv4(CLIENT4, TARGET4, 50002, 443, 0, b"quic", proto=17)]


def judge(raw: bytes) -> None:
    r = redirector()
    r.request(ipv4(CLIENT4, TARGET4, 50000, 443, SYN))  # a flow to hit
    r.request(ipv6(CLIENT6, TARGET6, 50001, 443, SYN))
    for handler in (r.request, r.reply, r.quic):
        verdict = handler(raw)
        assert isinstance(verdict, Action) or len(verdict) == len(raw)


@pytest.mark.parametrize("which", range(5))
def test_no_truncation_of_a_packet_raises(which: int) -> None:
    raw = samples()[which]
    for cut in range(len(raw)):
        judge(raw[:cut])


@pytest.mark.parametrize("seed", range(40))
def test_no_corrupted_packet_raises(seed: int) -> None:
    rng = random.Random(seed)
    raw = bytearray(rng.choice(samples()))
    for _ in range(rng.randrange(1, 4)):
        raw[rng.randrange(len(raw))] = rng.getrandbits(8)
    judge(bytes(raw))


def test_an_ip_length_that_leaves_no_room_for_the_tcp_header_is_no_tcp_packet() -> None:
    raw = bytearray(ipv4(CLIENT4, TARGET4, 50000, 443, SYN))
    struct.pack_into("!H", raw, 2, 24)  # total length: the IP header and 4 bytes
    assert packets.parse_tcp(bytes(raw)) is None
    assert redirector().request(bytes(raw)) is Action.PASS
