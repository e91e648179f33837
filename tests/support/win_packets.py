"""IPv4/IPv6 TCP packets built byte by byte, and read back with every checksum checked: code written
independently of llmtap.platform.windows.packets (RFC 791, 793, 8200 and 1071 by hand)."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10





def fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def word_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    return sum((data[i] << 8) | data[i + 1] for i in range(0, len(data), 2))


def checksum(data: bytes) -> int:
    return 0xFFFF - fold(word_sum(data))


def pseudo_header(version: int, src: bytes, dst: bytes, length: int, proto: int = 6) -> bytes:
    if version == 4:
        return src + dst + bytes([0, proto]) + length.to_bytes(2, "big")
    return src + dst + length.to_bytes(4, "big") + bytes([0, 0, 0, proto])


def tcp_segment(sport: int, dport: int, flags: int, payload: bytes) -> bytearray:
    options = b"\x02\x04\x05\xb4\x01\x03\x03\x08" if flags & SYN else b""  # MSS, NOP, wscale
    offset = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", sport, dport, 0x1A2B3C4D, 0x5E6F7081 if flags & ACK else 0,
                         offset << 4, flags, 64240, 0, 0)
    return bytearray(header + options + payload)


def ipv4(src: str, dst: str, sport: int, dport: int, flags: int, payload: bytes = b"",
         proto: int = 6) -> bytes:
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    segment = tcp_segment(sport, dport, flags, payload) if proto == 6 else bytearray(
        struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    at = 16 if proto == 6 else 6
    segment[at:at + 2] = checksum(pseudo_header(4, s, d, len(segment), proto) + segment).to_bytes(
        2, "big")
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), 0x4D2E, 0x4000, 128,
                                   proto, 0, s, d))
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header + segment)


def ipv6(src: str, dst: str, sport: int, dport: int, flags: int, payload: bytes = b"",
         next_header: int = 6) -> bytes:
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    segment = tcp_segment(sport, dport, flags, payload)
    segment[16:18] = checksum(pseudo_header(6, s, d, len(segment)) + segment).to_bytes(2, "big")
    header = struct.pack("!IHBB16s16s", 0x60012345, len(segment), next_header, 64, s, d)
    return header + bytes(segment)


def fields(raw: bytes) -> dict[str, Any]:
    """Reads a packet back, checking every checksum on the way."""
    version = raw[0] >> 4
    if version == 4:
        ihl = (raw[0] & 0x0F) * 4
        assert fold(word_sum(raw[:ihl])) == 0xFFFF, "bad IPv4 header checksum"
        src, dst = raw[12:16], raw[16:20]
        extra = {"ttl": raw[8], "ident": raw[4:6]}
    else:
        ihl = 40
        src, dst = raw[8:24], raw[24:40]
        extra = {"hop_limit": raw[7], "flow": raw[:4]}
    segment = raw[ihl:]
    assert fold(word_sum(pseudo_header(version, src, dst, len(segment)) + segment)) == 0xFFFF, \
        "bad TCP checksum"
    sport, dport = struct.unpack_from("!HH", segment)
    data_at = (segment[12] >> 4) * 4
    return {"src": (str(ipaddress.ip_address(src)), sport),
            "dst": (str(ipaddress.ip_address(dst)), dport),
            "flags": segment[13], "seq": segment[4:12], "options": segment[20:data_at],
            "payload": segment[data_at:], **extra}
