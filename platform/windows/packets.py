"""TCP packet bytes, IPv4 and IPv6: where the fields are, and a rewrite with full checksums.

Pure functions on raw bytes (what WinDivert hands over and takes back), so they run, and are
tested on real packet bytes, on any OS.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

Endpoint = tuple[str, int]

IPPROTO_TCP = 6
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10


def internet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum, in C: as 2**16 = 1 (mod 0xFFFF), the folded sum of the
    16-bit words is the whole big-endian number mod 0xFFFF (0xFFFF where that is 0 but the
    data is not: ones' complement's other zero)."""
    if len(data) % 2:
        data += b"\0"
    number = int.from_bytes(data, "big")
    total = number % 0xFFFF or (0xFFFF if number else 0)
    return ~total & 0xFFFF


def _text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def _packed(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


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
    if len(raw) < offset + 20 or not offset + 20 <= end <= len(raw):  # the TCP header inside it
        return None
    sport, dport = struct.unpack_from("!HH", raw, offset)
    return TcpPacket(
        version, offset, end, _text(src), _text(dst),
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
        packed = _packed(endpoint[0])
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


