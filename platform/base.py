"""The narrow interfaces every OS implements: redirect, trust store and service manager.

The daemon and pipeline only ever talk to these, so adding an OS never touches them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

# (ip, port) of the connection's original destination, looked up from the accepted socket.
OriginalAddrLookup = Callable[[object], tuple[str, int]]


@dataclass(frozen=True)
class TargetAddresses:
    """The resolved addresses of the target hosts, per family."""

    v4: frozenset[str] = frozenset()
    v6: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.v4) + len(self.v6)


# The conntrack zone of the proxy's own connections (the service user's), in their original
# direction: the clients' connections and the proxy's share one tuple space (this machine to the
# API, port 443), and a new connection whose tuple an old entry still holds takes that entry's
# NAT decision; in separate zones a client can never take one of the proxy's (and go direct,
# unintercepted), nor the proxy a client's (and be redirected into itself).
OWN_CONNTRACK_ZONE = 3857


@dataclass(frozen=True)
class RedirectPlan:
    """What to redirect, independent of the mechanism."""

    proxy_port: int
    service_uid: int  # the loop guard: this user's connections are never redirected
    ports: tuple[int, ...] = (443,)
    scope: str = "targets"  # targets | all
    block_quic: bool = True
    gateway_interfaces: tuple[str, ...] = field(default_factory=tuple)
    max_connections_per_user: int = 0  # concurrent connections into the proxy per uid; 0: no cap


class RedirectBackend(ABC):
    """Sends outbound TCP connections to the local proxy, tagged so it removes only its own rules."""

    name: ClassVar[str]
    # True when the OS removes the rules by itself the moment the owning process dies (nft
    # `flags owner`); otherwise the supervisor runs a guardian process that cleans up after it.
    dies_with_owner: ClassVar[bool] = False

    def __init__(self, plan: RedirectPlan) -> None:
        self.plan = plan

    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """Whether this mechanism can work on this machine (binary present, kernel support)."""

    @abstractmethod
    def install(self, addresses: TargetAddresses) -> None:
        """Applies every rule in one batch; on failure nothing of ours is left."""

    @abstractmethod
    def update_targets(self, addresses: TargetAddresses) -> None:
        """Replaces the target address set atomically."""

    @abstractmethod
    def remove(self) -> None:
        """Removes what install() added. Safe to call more than once."""

    @abstractmethod
    def alive(self) -> bool:
        """False if the rules were lost behind our back (e.g. the nft helper died)."""

    def refused_connections(self) -> int:
        """How many connections the per-user cap has refused so far (0 where there is none)."""
        return 0

    @classmethod
    @abstractmethod
    def rules_present(cls) -> bool:
        """Whether any rule of llmtap's (of this mechanism) is on the machine."""

    @classmethod
    @abstractmethod
    def cleanup_leftovers(cls) -> bool:
        """Removes every llmtap rule of this mechanism; True if something was removed."""

    def original_addr_lookup(self) -> OriginalAddrLookup | None:
        """A lookup for mitmproxy's transparent mode, or None where mitmproxy has its own (Linux)."""
        return None

    @classmethod
    def original_addr_channel(cls) -> OriginalAddrChannel | None:
        """Where the lookup needs root (macOS DIOCNATLOOK) but the proxy worker runs unprivileged:
        a channel the supervisor answers and the worker asks. None where it is not needed."""
        return None


class OriginalAddrChannel(ABC):
    """An original-destination lookup answered by the root supervisor. Made before the worker is
    forked; the worker asks through `lookup`, the supervisor answers once it calls `serve`."""

    @abstractmethod
    def serve(self) -> None:
        """In the supervisor, after the fork."""

    @abstractmethod
    def lookup(self, sock: object) -> tuple[str, int]:
        """In the worker: the original (ip, port) of an accepted connection."""


def plug_into_mitmproxy(lookup: OriginalAddrLookup) -> None:
    """Makes mitmproxy's transparent mode ask `lookup` for each connection's original destination,
    and keeps it from starting its own helpers (`sudo pfctl -s state` on macOS, a redirector with
    an unauthenticated local API on Windows)."""
    from mitmproxy import platform as mitmproxy_platform

    mitmproxy_platform.original_addr = lookup
    mitmproxy_platform.init_transparent_mode = lambda: None


class TrustStore(ABC):
    """Where the OS (and the runtimes that ignore it) learn to trust llmtap's CA."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def available(cls) -> bool: ...

    @abstractmethod
    def trust(self, ca_cert: Path) -> None: ...

    @abstractmethod
    def untrust(self) -> None: ...

    @abstractmethod
    def is_trusted(self, ca_cert: Path) -> bool: ...


class ServiceManager(ABC):
    """Runs `llmtap run` as a service that starts at boot and restarts on failure."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def available(cls) -> bool: ...

    @abstractmethod
    def install(self, command: list[str]) -> None: ...

    @abstractmethod
    def uninstall(self) -> None: ...

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def is_running(self) -> bool: ...
