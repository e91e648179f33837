"""Windows redirect: WinDivert (through pydivert) moves packets to and from a proxy that listens on
loopback only (the rewriting and why it takes this shape: llmtap.platform.windows.loopback).

Three handles: the clients' outbound packets to the targets (rewritten to LO:cp -> LO:proxy), the
proxy's replies on loopback (rewritten to T:443 -> C:cp), QUIC to the targets (dropped). Every
re-injected packet stays outbound. The proxy asks the same in-process table for the original
destination (`original_addr`): no local API, no other process. The proxy's own connections are
told apart by the owning process id of their first packet. WinDivert removes a handle's filter
when the handle closes, also when the process is killed, so no redirect outlives it.
"""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.base import OriginalAddrLookup, RedirectBackend, RedirectPlan, TargetAddresses
from llmtap.platform.windows.elevation import ElevationCheck, is_elevated, require_elevated
from llmtap.platform.windows.loopback import Action, Flows, Redirector, Targets, Verdict
from llmtap.platform.windows.packets import Endpoint, normalize
from llmtap.platform.windows.tcptable import TcpOwners

log = logging.getLogger("llmtap.windivert")

QUIC_PORT = 443
# WinDivert filters are limited in size: beyond this many addresses the filter matches the ports
# only and the address check happens here.
MAX_FILTER_ADDRESSES = 64
PYDIVERT_REQUIREMENT = "pydivert>=2.0.3,<=2.1.0"  # mitmproxy's own pin on Windows


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
    """The pid owning the TCP socket bound to `local` (GetExtendedTcpTable)."""
    return TcpOwners().owner(local)


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
    """The proxy's packets on loopback (its own upstream connections leave from other ports)."""
    return (f"outbound and tcp and tcp.SrcPort == {plan.proxy_port}"
            " and (ip.SrcAddr == 127.0.0.1 or ipv6.SrcAddr == ::1)")


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
        self, divert: Any, filter_: str, handler: Callable[[bytes], Verdict], name: str,
    ) -> None:
        self.divert = divert
        self.filter = filter_
        self.handler = handler
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
        self._handle.send(packet, recalculate_checksum=False)


# --- the backend ---------------------------------------------------------------------------------


class WindivertBackend(RedirectBackend):
    name = "windivert"
    dies_with_owner = True  # the driver drops a handle's filter when its process ends

    def __init__(
        self, plan: RedirectPlan, *, divert: Any = None,
        exempt: Callable[[Endpoint], bool] | None = None, elevated: ElevationCheck = is_elevated,
        direct: Callable[[Endpoint, Endpoint], bool] | None = None,
    ) -> None:
        super().__init__(plan)
        self._divert = divert
        self._elevated = elevated
        self.flows = Flows()
        self.redirector = Redirector(
            plan.proxy_port, Targets.build(plan, TargetAddresses()), self.flows,
            exempt or OwnProcessExemption(), direct or TcpOwners().connected,
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
                                     name="replies")
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
            for filter_, handler, name in (
                (render_request_filter(self.plan, filtered), self.redirector.request, "requests"),
                (render_quic_filter(self.plan, current), self.redirector.quic, "quic"),
            ):
                if filter_ is not None:
                    loops.append(self._loop(filter_, handler, name))
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
        return self.redirector.original_addr

    @classmethod
    def rules_present(cls) -> bool:
        return False  # a WinDivert filter exists only while its handle is open in a live process

    @classmethod
    def cleanup_leftovers(cls) -> bool:
        return False  # nothing can be left behind: see rules_present

    def _loop(
        self, filter_: str, handler: Callable[[bytes], Verdict], name: str
    ) -> DivertLoop:
        loop = DivertLoop(self._divert, filter_, handler, name)
        loop.start()
        return loop


def _import_pydivert() -> Any:
    try:
        return importlib.import_module("pydivert")
    except ImportError:
        raise UsageError(
            f"redirect.backend = 'windivert' needs pydivert: pip install '{PYDIVERT_REQUIREMENT}'"
        ) from None
