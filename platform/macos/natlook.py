"""The original destination of a pf-redirected connection: the DIOCNATLOOK ioctl on /dev/pf.

Layout from xnu bsd/net/pfvar.h. It is Apple's, not OpenBSD's: the ports are 4-byte
`union pf_state_xport` and there is a proto_variant byte, so OpenBSD-style code reads garbage.

    struct pf_addr { union { in_addr; in6_addr; u_int8_t[16]; u_int16_t[8]; u_int32_t[4]; } pfa; };
    union pf_state_xport { u_int16_t port; u_int16_t call_id; u_int32_t spi; };
    struct pfioc_natlook {
        struct pf_addr saddr, daddr, rsaddr, rdaddr;
        union pf_state_xport sxport, dxport, rsxport, rdxport;
        sa_family_t af; u_int8_t proto, proto_variant, direction;
    };                                                  // 84 bytes, 4-aligned
    #define DIOCNATLOOK _IOWR('D', 23, struct pfioc_natlook)   // 0xc0544417

The kernel refuses every pf ioctl to a caller that is not the superuser (pfioctl checks
kauth_cred_issuser), whatever the descriptor was opened with. The privilege-dropped proxy worker
therefore asks the root supervisor over an inherited socketpair (NatLookServer / NatLookClient):
no listening socket, so nothing else on the machine can ask.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from llmtap.platform.base import OriginalAddrChannel

Endpoint = tuple[str, int]

# Darwin's values: this module is also tested on Linux, where AF_INET6 is 10.
DARWIN_AF_INET = 2
DARWIN_AF_INET6 = 30
IPPROTO_TCP = 6
PF_OUT = 2  # enum { PF_INOUT, PF_IN, PF_OUT }

# sys/ioccom.h
IOC_OUT = 0x40000000
IOC_IN = 0x80000000
IOC_INOUT = IOC_IN | IOC_OUT
IOCPARM_MASK = 0x1FFF


class PfAddr(ctypes.Union):
    """struct pf_addr: its only member is the 16-byte union, so the union is the layout."""

    _fields_ = [
        ("v4addr", ctypes.c_uint8 * 4),
        ("v6addr", ctypes.c_uint8 * 16),
        ("addr8", ctypes.c_uint8 * 16),
        ("addr16", ctypes.c_uint16 * 8),
        ("addr32", ctypes.c_uint32 * 4),
    ]


class PfStateXport(ctypes.Union):
    _fields_ = [("port", ctypes.c_uint16), ("call_id", ctypes.c_uint16), ("spi", ctypes.c_uint32)]


class PfiocNatlook(ctypes.Structure):
    _fields_ = [
        ("saddr", PfAddr),
        ("daddr", PfAddr),
        ("rsaddr", PfAddr),
        ("rdaddr", PfAddr),
        ("sxport", PfStateXport),
        ("dxport", PfStateXport),
        ("rsxport", PfStateXport),
        ("rdxport", PfStateXport),
        ("af", ctypes.c_uint8),  # sa_family_t is u_int8_t on Darwin
        ("proto", ctypes.c_uint8),
        ("proto_variant", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
    ]


def iowr(group: str, number: int, size: int) -> int:
    """_IOWR from sys/ioccom.h."""
    return IOC_INOUT | ((size & IOCPARM_MASK) << 16) | (ord(group) << 8) | number


DIOCNATLOOK = iowr("D", 23, ctypes.sizeof(PfiocNatlook))


def normalize(address: str) -> str:
    """`::ffff:1.2.3.4` -> `1.2.3.4`, scope ids dropped: how pf keys its states."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def build_request(client: Endpoint, proxy: Endpoint) -> PfiocNatlook:
    """The query for the connection `client` -> `proxy` as the proxy's socket sees it.

    Given the translated connection with direction PF_OUT, the kernel looks up the rdr state and
    fills in rdaddr/rdxport with the address the client meant to reach. Ports go in network order.
    """
    src = ipaddress.ip_address(normalize(client[0]))
    dst = ipaddress.ip_address(normalize(proxy[0]))
    if src.version != dst.version:
        raise ValueError(f"address families differ: {client[0]} -> {proxy[0]}")
    pnl = PfiocNatlook()
    pnl.af = DARWIN_AF_INET if src.version == 4 else DARWIN_AF_INET6
    pnl.proto = IPPROTO_TCP
    pnl.direction = PF_OUT
    ctypes.memmove(ctypes.addressof(pnl.saddr), src.packed, len(src.packed))
    ctypes.memmove(ctypes.addressof(pnl.daddr), dst.packed, len(dst.packed))
    pnl.sxport.port = socket.htons(client[1])
    pnl.dxport.port = socket.htons(proxy[1])
    return pnl


def read_reply(pnl: PfiocNatlook) -> Endpoint:
    size = 4 if pnl.af == DARWIN_AF_INET else 16
    packed = bytes(pnl.rdaddr.addr8)[:size]
    return str(ipaddress.ip_address(packed)), socket.ntohs(pnl.rdxport.port)


Ioctl = Callable[[int, int, Any], Any]


class NatLook:
    """DIOCNATLOOK in this (root) process. The device is opened once, read-only: enough for it."""

    def __init__(self, device: str = "/dev/pf", ioctl: Ioctl = fcntl.ioctl) -> None:
        self.device = device
        self._ioctl = ioctl
        self._fd: int | None = None
        self._lock = threading.Lock()

    def lookup(self, client: Endpoint, proxy: Endpoint) -> Endpoint:
        pnl = build_request(client, proxy)
        try:
            self._ioctl(self._device_fd(), DIOCNATLOOK, pnl)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise LookupError(f"no pf state for {client[0]}:{client[1]}") from None
            if exc.errno == errno.EPERM:
                raise PermissionError("DIOCNATLOOK needs root (ask the supervisor)") from None
            raise
        return read_reply(pnl)

    def original_addr(self, sock: object) -> Endpoint:
        """mitmproxy's original_addr hook: (ip, port) the client connected to."""
        assert isinstance(sock, socket.socket)
        return self.lookup(_endpoint(sock.getpeername()), _endpoint(sock.getsockname()))

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _device_fd(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.device, os.O_RDONLY)
            return self._fd


def _endpoint(address: Any) -> Endpoint:
    return str(address[0]), int(address[1])


def natlook_channel() -> tuple[socket.socket, socket.socket]:
    """(server end, client end): create before forking the worker, which keeps the client end."""
    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return server, client


class NatLookServer:
    """Answers lookups in the root supervisor, one JSON line per question, until EOF."""

    def __init__(self, sock: socket.socket, natlook: NatLook) -> None:
        self._sock = sock
        self._natlook = natlook

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve, name="llmtap-natlook", daemon=True)
        thread.start()
        return thread

    def serve(self) -> None:
        with self._sock, self._sock.makefile("rb") as questions:
            for line in questions:
                self._sock.sendall(json.dumps(self.answer(line)).encode() + b"\n")

    def answer(self, line: bytes) -> dict[str, Any]:
        try:
            question = json.loads(line)
            client = _endpoint(question["client"])
            proxy = _endpoint(question["proxy"])
            return {"addr": list(self._natlook.lookup(client, proxy))}
        except (LookupError, OSError, ValueError, KeyError, TypeError) as exc:
            return {"error": str(exc) or type(exc).__name__}


class NatLookClient:
    """The worker's side: the same hook as NatLook, answered by the supervisor."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._answers = sock.makefile("rb")
        self._lock = threading.Lock()

    def lookup(self, client: Endpoint, proxy: Endpoint) -> Endpoint:
        question = json.dumps({"client": list(client), "proxy": list(proxy)}).encode() + b"\n"
        with self._lock:
            try:
                self._sock.sendall(question)
                line = self._answers.readline()
            except OSError:
                line = b""
        if not line:
            raise LookupError("the supervisor's natlook channel is closed")
        answer = json.loads(line)
        if "error" in answer:
            raise LookupError(answer["error"])
        return _endpoint(answer["addr"])

    def original_addr(self, sock: object) -> Endpoint:
        assert isinstance(sock, socket.socket)
        return self.lookup(_endpoint(sock.getpeername()), _endpoint(sock.getsockname()))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._answers.close()
            self._sock.close()


class NatLookChannel(OriginalAddrChannel):
    """DIOCNATLOOK needs root: the supervisor serves it over a socketpair made before the fork."""

    def __init__(self, natlook: NatLook | None = None) -> None:
        self._server_end, client_end = natlook_channel()
        self._client = NatLookClient(client_end)
        self._natlook = natlook
        # A forked child (the worker, the guardian) must not hold the supervisor's end.
        os.register_at_fork(after_in_child=self._server_end.close)

    def serve(self) -> None:
        self._client.close()  # the worker holds its own copy
        NatLookServer(self._server_end, self._natlook or NatLook()).start()

    def lookup(self, sock: object) -> Endpoint:
        return self._client.original_addr(sock)
