"""iptables redirect for machines without nft: our own chains, tagged, applied in one batch.

Chains `LLMTAP` (nat) and `LLMTAP_QUIC` (filter) hold every rule; the only rules placed in the
built-in OUTPUT chains are the jumps, tagged with the comment `llmtap`, so removal by tag never
touches anyone else's rules. These rules do not die with the process: the supervisor's guardian
and the cleanup at every start remove them.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass

from llmtap.platform.base import RedirectBackend, RedirectPlan, TargetAddresses

TAG = "llmtap"
NAT_CHAIN = "LLMTAP"
QUIC_CHAIN = "LLMTAP_QUIC"


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

    With `jumps`, the tagged jumps from OUTPUT are added too (only at install: re-adding them on
    each target refresh would stack duplicates).
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
    lines = [
        "*nat",
        f":{NAT_CHAIN} - [0:0]",
        f"-A {NAT_CHAIN} {guard}",
        f"-A {NAT_CHAIN} -m addrtype --dst-type LOCAL -j RETURN",
        *(f"-A {NAT_CHAIN} {rule}" for rule in redirects),
    ]
    if jumps:
        lines.append(f'-A OUTPUT -p tcp -m comment --comment "{TAG}" -j {NAT_CHAIN}')
    lines.append("COMMIT")
    if plan.block_quic:
        lines += [
            "*filter",
            f":{QUIC_CHAIN} - [0:0]",
            f"-A {QUIC_CHAIN} {guard}",
            *(
                f"-A {QUIC_CHAIN} -d {addr}{family.host_mask} -p udp --dport 443 -j REJECT"
                for addr in sorted(addresses)
            ),
        ]
        if jumps:
            lines.append(f'-A OUTPUT -p udp -m comment --comment "{TAG}" -j {QUIC_CHAIN}')
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def tagged_deletions(saved: str) -> list[list[str]]:
    """From iptables-save output: the `-D` arguments for every tagged rule in a built-in chain,
    then the flush and delete of our own chains, per table."""
    commands: list[list[str]] = []
    chains: list[tuple[str, str]] = []
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":") and line[1:].split()[0] in (NAT_CHAIN, QUIC_CHAIN):
            chains.append((table, line[1:].split()[0]))
        elif line.startswith("-A "):
            args = shlex.split(line)
            if _has_tag(args) and args[1] not in (NAT_CHAIN, QUIC_CHAIN):
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
            result = subprocess.run(
                [family.restore, "-w", "-n"], input=batch, capture_output=True, text=True
            )
            if result.returncode != 0:
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
                subprocess.run([family.binary, "-w", *args], capture_output=True, text=True)
                removed = True
        return removed

    @staticmethod
    def _save(family: Family) -> str:
        result = subprocess.run([family.save], capture_output=True, text=True)
        return result.stdout if result.returncode == 0 else ""
