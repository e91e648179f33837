"""iptables redirect for machines without nft: our own chains, tagged, applied in one batch.

Chains `LLMTAP` (nat) and `LLMTAP_QUIC` (filter) hold every rule; the only rules placed in the
built-in OUTPUT chains are the jumps, tagged with the comment `llmtap`, so removal by tag never
touches anyone else's rules. These rules do not die with the process: the supervisor's guardian
and the cleanup at every start remove them.
"""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass
from typing import ClassVar

from llmtap.platform.base import OWN_CONNTRACK_ZONE, RedirectBackend, RedirectPlan, TargetAddresses
from llmtap.platform.runner import Runner, SubprocessRunner

TAG = "llmtap"
NAT_CHAIN = "LLMTAP"
QUIC_CHAIN = "LLMTAP_QUIC"
GW_NAT_CHAIN = "LLMTAP_GW"  # gateway mode: forwarded IPv4 TCP, DNATed to the loopback proxy
GW_FWD_CHAIN = "LLMTAP_GW_FWD"  # gateway mode: forwarded IPv6 TCP and QUIC to targets, rejected
GW_IN_CHAIN = "LLMTAP_GW_IN"  # gateway mode: packets for 127.0.0.0/8 we did not DNAT, dropped
ZONE_CHAIN = "LLMTAP_ZONE"  # the proxy's own connections, in a conntrack zone of their own
OWN_CHAINS = (NAT_CHAIN, QUIC_CHAIN, GW_NAT_CHAIN, GW_FWD_CHAIN, GW_IN_CHAIN, ZONE_CHAIN)


class IptablesError(RuntimeError):
    pass


@dataclass(frozen=True)
class Family:
    save: str
    restore: str
    binary: str
    host_mask: str


IPV4 = Family("iptables-save", "iptables-restore", "iptables", "/32")
IPV6 = Family("ip6tables-save", "ip6tables-restore", "ip6tables", "/128")


def render_restore(plan: RedirectPlan, addresses: frozenset[str], family: Family, jumps: bool) -> str:
    """iptables-restore input (for `-n`): declaring our chains flushes them, then refills them.

    With `jumps`, the tagged jumps from the built-in chains are added too (only at install:
    re-adding them on each target refresh would stack duplicates).
    """
    ports = ",".join(str(p) for p in plan.ports)
    guard = f"-m owner --uid-owner {plan.service_uid} -j RETURN"
    if plan.scope == "all":
        redirects = [f"-p tcp -m multiport --dports {ports} -j REDIRECT --to-ports {plan.proxy_port}"]
    else:
        redirects = [
            f"-d {addr}{family.host_mask} -p tcp -m multiport --dports {ports} "
            f"-j REDIRECT --to-ports {plan.proxy_port}"
            for addr in sorted(addresses)
        ]
    nat = [
        f"-A {NAT_CHAIN} {guard}",
        f"-A {NAT_CHAIN} -m addrtype --dst-type LOCAL -j RETURN",
        *(f"-A {NAT_CHAIN} {rule}" for rule in redirects),
    ]
    if jumps:
        nat.append(f'-A OUTPUT -p tcp -m comment --comment "{TAG}" -j {NAT_CHAIN}')
    nat_chains = [NAT_CHAIN]
    filter_chains: list[str] = []
    filters: list[str] = []
    if plan.block_quic:
        filter_chains.append(QUIC_CHAIN)
        filters += [
            f"-A {QUIC_CHAIN} {guard}",
            *(
                f"-A {QUIC_CHAIN} -d {addr}{family.host_mask} -p udp --dport 443 -j REJECT"
                for addr in sorted(addresses)
            ),
        ]
        if jumps:
            filters.append(f'-A OUTPUT -p udp -m comment --comment "{TAG}" -j {QUIC_CHAIN}')
    if plan.gateway_interfaces and family is IPV4:
        nat_chains.append(GW_NAT_CHAIN)
        nat += _gateway_dnat(plan, addresses, ports, jumps)
        filter_chains.append(GW_IN_CHAIN)
        filters += _gateway_loopback_guard(plan, jumps)
    if plan.gateway_interfaces and (family is IPV6 or plan.block_quic):
        filter_chains.append(GW_FWD_CHAIN)
        filters += _gateway_rejects(plan, addresses, family, ports, jumps)
    raw = [f"-A {ZONE_CHAIN} -m owner --uid-owner {plan.service_uid} "
           f"-j CT --zone-orig {OWN_CONNTRACK_ZONE}"]
    if jumps:
        raw.append(f'-A OUTPUT -m comment --comment "{TAG}" -j {ZONE_CHAIN}')
    lines = ["*raw", f":{ZONE_CHAIN} - [0:0]", *raw, "COMMIT",
             "*nat", *(f":{chain} - [0:0]" for chain in nat_chains), *nat, "COMMIT"]
    if filter_chains:
        lines += ["*filter", *(f":{chain} - [0:0]" for chain in filter_chains), *filters, "COMMIT"]
    return "\n".join(lines) + "\n"


def _gateway_dnat(plan: RedirectPlan, addresses: frozenset[str], ports: str, jumps: bool) -> list[str]:
    """Forwarded IPv4 TCP from the gateway interfaces -> the loopback proxy (see platform.linux.gateway)."""
    dnat = f"-p tcp -m multiport --dports {ports} -j DNAT --to-destination 127.0.0.1:{plan.proxy_port}"
    rules = [dnat] if plan.scope == "all" else [f"-d {addr}/32 {dnat}" for addr in sorted(addresses)]
    lines = [
        f"-A {GW_NAT_CHAIN} -m addrtype --dst-type LOCAL -j RETURN",
        *(f"-A {GW_NAT_CHAIN} {rule}" for rule in rules),
    ]
    if jumps:
        lines += [f'-A PREROUTING -i {name} -p tcp -m comment --comment "{TAG}" -j {GW_NAT_CHAIN}'
                  for name in plan.gateway_interfaces]
    return lines


def _gateway_loopback_guard(plan: RedirectPlan, jumps: bool) -> list[str]:
    """route_localnet would let a container reach any loopback service here by sending packets
    to 127.0.0.1 (CVE-2020-8558): only the connections we DNATed may arrive there."""
    lines = [f"-A {GW_IN_CHAIN} -d 127.0.0.0/8 -m conntrack ! --ctstate DNAT -j DROP"]
    if jumps:
        lines += [f'-A INPUT -i {name} -m comment --comment "{TAG}" -j {GW_IN_CHAIN}'
                  for name in plan.gateway_interfaces]
    return lines


def _gateway_rejects(plan: RedirectPlan, addresses: frozenset[str], family: Family, ports: str,
                     jumps: bool) -> list[str]:
    """Forwarded IPv6 TCP to targets is reset (clients fall back to IPv4), QUIC to targets rejected."""
    rules = []
    for addr in sorted(addresses):
        if family is IPV6:
            rules.append(f"-d {addr}{family.host_mask} -p tcp -m multiport --dports {ports} "
                         "-j REJECT --reject-with tcp-reset")
        if plan.block_quic:
            rules.append(f"-d {addr}{family.host_mask} -p udp --dport 443 -j REJECT")
    lines = [f"-A {GW_FWD_CHAIN} {rule}" for rule in rules]
    if jumps:
        lines += [f'-A FORWARD -i {name} -m comment --comment "{TAG}" -j {GW_FWD_CHAIN}'
                  for name in plan.gateway_interfaces]
    return lines


def tagged_deletions(saved: str) -> list[list[str]]:
    """From iptables-save output: the `-D` arguments for every tagged rule in a built-in chain,
    then the flush and delete of our own chains, per table."""
    commands: list[list[str]] = []
    chains: list[tuple[str, str]] = []
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":") and line[1:].split()[0] in OWN_CHAINS:
            chains.append((table, line[1:].split()[0]))
        elif line.startswith("-A "):
            args = shlex.split(line)
            if _has_tag(args) and args[1] not in OWN_CHAINS:
                commands.append(["-t", table, "-D", *args[1:]])
    for table_name, chain in chains:
        commands.append(["-t", table_name, "-F", chain])
    for table_name, chain in chains:
        commands.append(["-t", table_name, "-X", chain])
    return commands


def _has_tag(args: list[str]) -> bool:
    return any(a == "--comment" and i + 1 < len(args) and args[i + 1] == TAG for i, a in enumerate(args))


class IptablesBackend(RedirectBackend):
    name = "iptables"
    dies_with_owner = False
    runner: ClassVar[Runner] = SubprocessRunner()  # tests replace it

    def __init__(self, plan: RedirectPlan) -> None:
        super().__init__(plan)
        self._installed = False

    @classmethod
    def available(cls) -> bool:
        return all(shutil.which(b) for b in ("iptables-restore", "iptables-save", "iptables"))

    @classmethod
    def _families(cls) -> list[Family]:
        # IPv6 is optional: a machine without ip6tables still gets its IPv4 rules.
        return [f for f in (IPV4, IPV6) if shutil.which(f.restore) and shutil.which(f.save)]

    def install(self, addresses: TargetAddresses) -> None:
        self.cleanup_leftovers()
        try:
            self._apply(addresses, jumps=True)
        except BaseException:
            self.cleanup_leftovers()
            raise
        self._installed = True

    def update_targets(self, addresses: TargetAddresses) -> None:
        if not self._installed:
            raise IptablesError("the redirect is not installed")
        self._apply(addresses, jumps=False)

    def _apply(self, addresses: TargetAddresses, jumps: bool) -> None:
        for family in self._families():
            addrs = addresses.v4 if family is IPV4 else addresses.v6
            batch = render_restore(self.plan, addrs, family, jumps)
            result = self.runner([family.restore, "-w", "-n"], batch)
            if not result.ok:
                reason = (result.stderr.strip().splitlines() or ["unknown error"])[0]
                raise IptablesError(f"{family.restore} failed: {reason}")

    def remove(self) -> None:
        if self._installed:
            self.cleanup_leftovers()
            self._installed = False

    def alive(self) -> bool:
        return self._installed

    @classmethod
    def rules_present(cls) -> bool:
        return any(tagged_deletions(cls._save(f)) for f in cls._families())

    @classmethod
    def cleanup_leftovers(cls) -> bool:
        removed = False
        for family in cls._families():
            for args in tagged_deletions(cls._save(family)):
                cls.runner([family.binary, "-w", *args])
                removed = True
        return removed

    @classmethod
    def _save(cls, family: Family) -> str:
        result = cls.runner([family.save])
        return result.stdout if result.ok else ""
