"""Resolving the target hosts into the address sets the redirect matches on.

Addresses come from the system resolver (so /etc/hosts and nsswitch apply, as they do for the
clients); TTLs, which getaddrinfo hides, are asked of DNS directly when it answers. An address that
disappears from DNS stays in the set for a grace period: clients keep using cached answers.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from llmtap.hostpatterns import HostSet
from llmtap.platform.base import TargetAddresses

log = logging.getLogger(__name__)

MIN_REFRESH_S = 30


@dataclass(frozen=True)
class Lookup:
    addresses: frozenset[str]
    ttl_s: int | None  # None when DNS did not tell (e.g. the answer came from /etc/hosts)


def system_lookup(host: str) -> Lookup:
    try:
        infos = socket.getaddrinfo(host, 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        log.warning("cannot resolve target %s: %s", host, exc)
        return Lookup(frozenset(), None)
    addresses = frozenset(str(info[4][0]).split("%")[0] for info in infos)
    return Lookup(addresses, DNS_TTLS.ttl(host))


class DnsTtls:
    """TTLs asked of DNS directly. When no name server answers (answers come from /etc/hosts, or
    the network is down) it stops asking for a while, so a refresh never waits on timeouts."""

    LIFETIME_S = 1.0
    BACKOFF_S = 300.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._silent_until = 0.0

    def ttl(self, host: str) -> int | None:
        import dns.exception
        import dns.resolver

        if self._clock() < self._silent_until:
            return None
        ttls = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = dns.resolver.resolve(host, rdtype, lifetime=self.LIFETIME_S)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except (dns.exception.DNSException, OSError):
                self._silent_until = self._clock() + self.BACKOFF_S
                return None
            if answer.rrset is not None:
                ttls.append(answer.rrset.ttl)
        return min(ttls) if ttls else None


DNS_TTLS = DnsTtls()


class TargetResolver:
    """Keeps the set of addresses to redirect, with a grace period for vanished ones."""

    def __init__(
        self,
        hosts: Iterable[str],
        grace_s: float,
        refresh_max_s: float,
        lookup: Callable[[str], Lookup] = system_lookup,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hosts = tuple(hosts)
        self.grace_s = grace_s
        self.refresh_max_s = refresh_max_s
        self._lookup = lookup
        self._clock = clock
        self._last_seen: dict[str, float] = {}
        self.by_host: dict[str, list[str]] = {}

    def refresh(self) -> tuple[TargetAddresses, float]:
        """Looks every host up again: (addresses to redirect, seconds until the next refresh)."""
        now = self._clock()
        ttls: list[int] = []
        for host in self.hosts:
            found = self._lookup(host)
            self.by_host[host] = sorted(found.addresses)
            for address in found.addresses:
                self._last_seen[address] = now
            if found.ttl_s is not None:
                ttls.append(found.ttl_s)
        self._last_seen = {a: t for a, t in self._last_seen.items() if now - t <= self.grace_s}
        next_in = min(self.refresh_max_s, max(MIN_REFRESH_S, min(ttls, default=self.refresh_max_s)))
        return split_families(self._last_seen), float(next_in)


def redirect_names(targets: HostSet, scope: str) -> tuple[str, ...]:
    """The names whose addresses are redirected: the concrete targets and each name a region
    pattern stands for. A leftmost wildcard (`*.openai.azure.com`) has no address of its own: with
    scope "targets" only the concrete names listed under it are redirected, so say so."""
    for pattern in targets.unresolvable if scope == "targets" else ():
        log.warning("target %s: no name under it is listed, so none of its connections are "
                    "redirected (scope \"targets\"): add the names you use (e.g. %s) to "
                    "targets.extra_hosts, or set redirect.scope = \"all\"",
                    pattern, pattern.replace("*", "myname", 1))
    return targets.resolvable


def split_families(addresses: Iterable[str]) -> TargetAddresses:
    v4, v6 = set(), set()
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if ip.version == 4:
            v4.add(str(ip))
        elif ip.ipv4_mapped:
            v4.add(str(ip.ipv4_mapped))
        else:
            v6.add(str(ip))
    return TargetAddresses(frozenset(v4), frozenset(v6))
