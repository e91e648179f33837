"""DIOCNATLOOK: struct pfioc_natlook packed exactly as xnu's bsd/net/pfvar.h lays it out."""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from llmtap.platform.base import plug_into_mitmproxy
from llmtap.platform.macos import natlook
from llmtap.platform.macos.natlook import (
    DIOCNATLOOK,
    NatLook,
    NatLookClient,
    NatLookServer,
    PfiocNatlook,
    build_request,
    natlook_channel,
)

# struct pfioc_natlook from xnu bsd/net/pfvar.h, field by field: 4 x struct pf_addr (16 bytes),
# 4 x union pf_state_xport (u_int16_t port | u_int16_t call_id | u_int32_t spi: 4 bytes),
# then sa_family_t af (u_int8_t on Darwin), u_int8_t proto, proto_variant, direction.
HEADER_LAYOUT = [
    ("saddr", 0, 16), ("daddr", 16, 16), ("rsaddr", 32, 16), ("rdaddr", 48, 16),
    ("sxport", 64, 4), ("dxport", 68, 4), ("rsxport", 72, 4), ("rdxport", 76, 4),
    ("af", 80, 1), ("proto", 81, 1), ("proto_variant", 82, 1), ("direction", 83, 1),
]
# The same struct as a struct-module format: standard sizes, no implicit padding.
HEADER_FORMAT = "=16s16s16s16s" + "2s2x" * 4 + "BBBB"


def test_layout_matches_the_xnu_header() -> None:
    assert ctypes.sizeof(PfiocNatlook) == struct.calcsize(HEADER_FORMAT) == 84
    assert ctypes.alignment(PfiocNatlook) == 4  # pf_addr's u_int32_t and the spi member
    for name, offset, size in HEADER_LAYOUT:
        field = getattr(PfiocNatlook, name)
        assert (field.offset, field.size) == (offset, size), name


def test_ioctl_number_is_iowr_d_23() -> None:
    # _IOWR('D', 23, struct pfioc_natlook): IOC_INOUT | (84 << 16) | ('D' << 8) | 23
    assert DIOCNATLOOK == 0xC0544417
    assert natlook.iowr("D", 23, 84) == 0xC0000000 | (84 << 16) | (0x44 << 8) | 23


def expected_bytes(client: tuple[str, int], proxy: tuple[str, int], af: int) -> bytes:
    src = ipaddress.ip_address(client[0]).packed.ljust(16, b"\0")
    dst = ipaddress.ip_address(proxy[0]).packed.ljust(16, b"\0")
    port = struct.Struct("!H").pack  # network order in memory, whatever the host's order
    return struct.pack(
        HEADER_FORMAT, src, dst, b"", b"", port(client[1]), port(proxy[1]), b"\0\0", b"\0\0",
        af, 6, 0, 2,  # IPPROTO_TCP, no variant, PF_OUT
    )


def test_ipv4_request_packing() -> None:
    pnl = build_request(("192.168.1.23", 52431), ("127.0.0.1", 8443))
    assert bytes(pnl) == expected_bytes(("192.168.1.23", 52431), ("127.0.0.1", 8443), 2)


def test_ipv6_request_uses_darwins_af_inet6() -> None:
    client, proxy = ("2a01:e0a:1d5:7c40:8d3:21f4:9a1b:3c2e", 52432), ("::1", 8443)
    pnl = build_request(client, proxy)
    assert pnl.af == 30  # not Linux's 10
    assert bytes(pnl) == expected_bytes(client, proxy, 30)


def test_mapped_ipv4_is_looked_up_as_ipv4() -> None:
    pnl = build_request(("::ffff:192.168.1.23", 52431), ("::ffff:127.0.0.1", 8443))
    assert pnl.af == 2
    assert bytes(pnl.saddr.addr8)[:4] == bytes([192, 168, 1, 23])


def test_mixed_families_are_refused() -> None:
    with pytest.raises(ValueError, match="families differ"):
        build_request(("192.168.1.23", 1), ("::1", 8443))


class FakeKernel:
    """Plays pf: checks the question and writes the rdr state's original destination back."""

    def __init__(self, answer: tuple[str, int] | None, fail: int | None = None) -> None:
        self.answer = answer
        self.fail = fail
        self.questions: list[tuple[int, int, bytes]] = []

    def __call__(self, fd: int, request: int, arg: Any) -> int:
        self.questions.append((fd, request, bytes(arg)))
        if self.fail is not None:
            raise OSError(self.fail, errno.errorcode[self.fail])
        assert request == DIOCNATLOOK
        assert isinstance(arg, PfiocNatlook) and arg.direction == 2
        assert self.answer is not None
        packed = ipaddress.ip_address(self.answer[0]).packed
        ctypes.memmove(ctypes.addressof(arg.rdaddr), packed, len(packed))
        arg.rdxport.port = socket.htons(self.answer[1])
        return 0


@pytest.fixture
def device(tmp_path: Path) -> str:
    path = tmp_path / "pf"
    path.write_bytes(b"")
    return str(path)


def test_lookup_reads_the_original_destination(device: str) -> None:
    kernel = FakeKernel(("160.79.104.10", 443))
    look = NatLook(device, ioctl=kernel)
    assert look.lookup(("192.168.1.23", 52431), ("127.0.0.1", 8443)) == ("160.79.104.10", 443)
    assert look.lookup(("192.168.1.23", 52432), ("127.0.0.1", 8443)) == ("160.79.104.10", 443)
    assert kernel.questions[0][0] == kernel.questions[1][0]  # one descriptor, opened once
    look.close()


def test_lookup_ipv6(device: str) -> None:
    look = NatLook(device, ioctl=FakeKernel(("2607:6bc0::10", 443)))
    client = ("2a01:e0a:1d5:7c40:8d3:21f4:9a1b:3c2e", 52432)
    assert look.lookup(client, ("::1", 8443)) == ("2607:6bc0::10", 443)


def test_original_addr_of_a_real_accepted_socket(device: str) -> None:
    kernel = FakeKernel(("160.79.104.10", 443))
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            assert NatLook(device, ioctl=kernel).original_addr(accepted) == ("160.79.104.10", 443)
            asked = kernel.questions[0][2]
            assert asked == expected_bytes(client.getsockname(), server.getsockname(), 2)


@pytest.mark.parametrize(
    ("code", "error"), [(errno.ENOENT, LookupError), (errno.EPERM, PermissionError)]
)
def test_kernel_refusals(device: str, code: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        NatLook(device, ioctl=FakeKernel(None, fail=code)).lookup(("10.0.0.2", 1), ("127.0.0.1", 2))


def test_the_worker_asks_the_supervisor_over_a_socketpair(device: str) -> None:
    server_end, client_end = natlook_channel()
    thread = NatLookServer(server_end, NatLook(device, ioctl=FakeKernel(("160.79.104.10", 443)))).start()
    asker = NatLookClient(client_end)
    for port in (52431, 52432, 52433):
        assert asker.lookup(("192.168.1.23", port), ("127.0.0.1", 8443)) == ("160.79.104.10", 443)
    asker.close()
    thread.join(timeout=5)
    assert not thread.is_alive()  # the server ends with the channel


def test_refusals_cross_the_socketpair_as_lookup_errors(device: str) -> None:
    server_end, client_end = natlook_channel()
    NatLookServer(server_end, NatLook(device, ioctl=FakeKernel(None, fail=errno.ENOENT))).start()
    asker = NatLookClient(client_end)
    with pytest.raises(LookupError, match=r"no pf state for 192\.168\.1\.23:52431"):
        asker.lookup(("192.168.1.23", 52431), ("127.0.0.1", 8443))
    asker.close()


def test_a_closed_channel_is_a_lookup_error() -> None:
    server_end, client_end = natlook_channel()
    server_end.close()
    with pytest.raises(LookupError, match="closed"):
        NatLookClient(client_end).lookup(("192.168.1.23", 1), ("127.0.0.1", 2))


def test_plugs_into_mitmproxys_original_addr_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    from mitmproxy import platform as mitmproxy_platform

    monkeypatch.setattr(mitmproxy_platform, "original_addr", mitmproxy_platform.original_addr)
    own_init = mitmproxy_platform.init_transparent_mode
    monkeypatch.setattr(mitmproxy_platform, "init_transparent_mode", own_init)
    look = NatLook("/nonexistent")
    plug_into_mitmproxy(look.original_addr)
    assert mitmproxy_platform.original_addr == look.original_addr
    assert mitmproxy_platform.init_transparent_mode is not own_init
    mitmproxy_platform.init_transparent_mode()  # starts nothing of mitmproxy's


def test_channel_made_before_a_fork_is_answered_by_the_parent(device: str) -> None:
    """As the supervisor uses it: made before forking the worker, served by the parent after,
    asked by the child (which cannot open /dev/pf itself)."""
    from llmtap.platform.macos.natlook import NatLookChannel

    channel = NatLookChannel(NatLook(device, ioctl=FakeKernel(("160.79.104.10", 443))))
    answers_r, answers_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "worker"
        code = 1
        try:
            with socket.create_server(("127.0.0.1", 0)) as server:
                client = socket.create_connection(server.getsockname())
                accepted, _ = server.accept()
                with client, accepted:
                    os.write(answers_w, json.dumps(channel.lookup(accepted)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(answers_w)
    channel.serve()
    _, status = os.waitpid(pid, 0)
    with os.fdopen(answers_r) as answers:
        assert json.loads(answers.read()) == ["160.79.104.10", 443]
    assert os.waitstatus_to_exitcode(status) == 0
