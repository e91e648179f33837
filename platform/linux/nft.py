"""nftables redirect: one table `inet llmtap` with `flags owner`, held by a long-lived `nft -i`.

The table is owned by the netlink socket of the `nft -i` child, which reads its commands from our
pipe. When the supervisor dies, even by SIGKILL, the pipe closes, `nft` exits (it also gets
SIGTERM through PR_SET_PDEATHSIG) and the kernel deletes the table: no rule outlives the daemon.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
from typing import ClassVar

from llmtap.platform.base import OWN_CONNTRACK_ZONE, RedirectBackend, RedirectPlan, TargetAddresses
from llmtap.platform.linux.proc import parent_death_signal
from llmtap.platform.runner import Runner, Starter, SubprocessRunner, start_interactive

TABLE = "llmtap"
FAMILY = "inet"


class NftError(RuntimeError):
    """nft refused a command; the message is nft's own first error line."""


def render_ruleset(plan: RedirectPlan) -> str:
    """The whole table, applied in one batch (so it exists completely or not at all)."""
    ports = ", ".join(str(p) for p in plan.ports)
    if plan.scope == "all":
        redirect = [f"meta l4proto tcp th dport {{ {ports} }} redirect to :{plan.proxy_port}"]
    else:
        redirect = [
            f"ip daddr @targets4 tcp dport {{ {ports} }} redirect to :{plan.proxy_port}",
            f"ip6 daddr @targets6 tcp dport {{ {ports} }} redirect to :{plan.proxy_port}",
        ]
    lines = [
        f"table {FAMILY} {TABLE} {{",
        "\tflags owner",
        "\tset targets4 { type ipv4_addr; }",
        "\tset targets6 { type ipv6_addr; }",
        "\tchain zone_own {",
        "\t\ttype filter hook output priority raw; policy accept;",
        f"\t\tmeta skuid {plan.service_uid} ct original zone set {OWN_CONNTRACK_ZONE}",
        "\t}",
        "\tchain redirect_output {",
        "\t\ttype nat hook output priority -100; policy accept;",
        f"\t\tmeta skuid {plan.service_uid} return",
        "\t\tfib daddr type local return",
        *(f"\t\t{rule}" for rule in redirect),
        "\t}",
    ]
    if plan.block_quic:
        lines += [
            "\tchain block_quic {",
            "\t\ttype filter hook output priority filter; policy accept;",
            f"\t\tmeta skuid {plan.service_uid} return",
            "\t\tip daddr @targets4 udp dport 443 reject",
            "\t\tip6 daddr @targets6 udp dport 443 reject",
            "\t}",
        ]
    if plan.max_connections_per_user:
        lines += _connection_cap(plan)
    if plan.gateway_interfaces:
        lines += _gateway_chains(plan, ports)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _connection_cap(plan: RedirectPlan) -> list[str]:
    """Each local user's concurrent connections into the proxy, capped by the kernel: a new one
    past the cap is reset before the proxy sees it, so one user's flood (idle connections hold
    a descriptor each) never starves another user's requests. Counted in `refused`."""
    return [
        "\tset per_user { type uid; flags dynamic; }",
        "\tcounter refused { }",
        "\tchain connection_cap {",
        "\t\ttype filter hook output priority filter; policy accept;",
        f"\t\tmeta skuid {plan.service_uid} return",
        f"\t\tct state new ct status dnat tcp dport {plan.proxy_port} add @per_user "
        f"{{ meta skuid ct count over {plan.max_connections_per_user} }} counter name refused "
        "reject with tcp reset",
        "\t}",
    ]


def _gateway_chains(plan: RedirectPlan, ports: str) -> list[str]:
    """Traffic forwarded from the gateway interfaces: IPv4 TCP is DNATed to the loopback proxy
    (needs route_localnet, see gateway.py); IPv6 TCP to targets is reset so clients fall back
    to IPv4 (::1 is unreachable from outside); QUIC to targets is rejected as for local clients.
    route_localnet would also let a container send packets straight to 127.0.0.1 and reach any
    loopback service here (CVE-2020-8558): gateway_input drops those unless we DNATed them.
    The loop guard needs no rule here: the proxy's own connections never enter on these
    interfaces, they leave through the output hook."""
    names = ", ".join(f'"{name}"' for name in plan.gateway_interfaces)
    proxy = f"dnat ip to 127.0.0.1:{plan.proxy_port}"
    if plan.scope == "all":
        dnat = f"meta nfproto ipv4 tcp dport {{ {ports} }} {proxy}"
    else:
        dnat = f"ip daddr @targets4 tcp dport {{ {ports} }} {proxy}"
    forward = [f"ip6 daddr @targets6 tcp dport {{ {ports} }} reject with tcp reset"]
    if plan.block_quic:
        forward += ["ip daddr @targets4 udp dport 443 reject",
                    "ip6 daddr @targets6 udp dport 443 reject"]
    return [
        "\tchain gateway_prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
        f"\t\tiifname != {{ {names} }} return",
        "\t\tfib daddr type local return",
        f"\t\t{dnat}",
        "\t}",
        "\tchain gateway_input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        f"\t\tiifname != {{ {names} }} return",
        "\t\tct status dnat return",
        "\t\tip daddr 127.0.0.0/8 drop",
        "\t}",
        "\tchain gateway_forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        f"\t\tiifname != {{ {names} }} return",
        *(f"\t\t{rule}" for rule in forward),
        "\t}",
    ]


def render_set_update(old: TargetAddresses, new: TargetAddresses) -> str:
    """Commands turning the sets from `old` into `new` (deleting only what is there)."""
    commands = []
    for set_name, before, after in (("targets4", old.v4, new.v4), ("targets6", old.v6, new.v6)):
        if gone := sorted(before - after):
            commands.append(f"delete element {FAMILY} {TABLE} {set_name} {{ {', '.join(gone)} }}")
        if added := sorted(after - before):
            commands.append(f"add element {FAMILY} {TABLE} {set_name} {{ {', '.join(added)} }}")
    return "; ".join(commands)


class NftSession:
    """A long-lived `nft -i`: the owner of our table. Commands are synchronous.

    After each command we send one that is sure to fail (listing a table that does not exist) and
    read stderr up to its echo: any error printed before it belongs to our command.
    """

    def __init__(self, start: Starter = start_interactive) -> None:
        self._proc = start(["nft", "-i"], functools.partial(parent_death_signal, os.getpid()))
        self._lock = threading.Lock()
        self._sync = itertools.count(1)

    def run(self, command: str) -> None:
        marker = f"{TABLE}_sync_{next(self._sync)}"
        assert self._proc.stdin and self._proc.stderr
        with self._lock:
            try:
                self._proc.stdin.write(f"{command}\nlist table {FAMILY} {marker}\n")
                self._proc.stdin.flush()
            except BrokenPipeError:
                raise NftError("the nft helper process has exited") from None
            errors: list[str] = []
            while True:
                line = self._proc.stderr.readline()
                if not line:
                    raise NftError("the nft helper process has exited")
                if marker in line:
                    self._proc.stderr.readline()  # the caret line under the echo
                    break
                if "Error:" in line:
                    errors.append(line.strip())
            # The sentinel's own "No such file or directory" is the last error: drop it.
            errors = errors[:-1]
        if errors:
            raise NftError(errors[0])

    def alive(self) -> bool:
        return self._proc.poll() is None

    def close(self) -> None:
        """Closing stdin ends nft, and with it the table."""
        if self._proc.stdin:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


class NftBackend(RedirectBackend):
    name = "nft"
    dies_with_owner = True
    runner: ClassVar[Runner] = SubprocessRunner()  # the one-shot commands (tests replace it)
    start: ClassVar[Starter] = staticmethod(start_interactive)  # the owner session

    def __init__(self, plan: RedirectPlan) -> None:
        super().__init__(plan)
        self._session: NftSession | None = None
        self._addresses = TargetAddresses()

    @classmethod
    def available(cls) -> bool:
        if not shutil.which("nft"):
            return False
        return cls.runner(["nft", "list", "tables"]).ok

    def install(self, addresses: TargetAddresses) -> None:
        session = NftSession(type(self).start)
        try:
            # `include` lets the whole table go in as one multi-line batch through the owner socket.
            with tempfile.NamedTemporaryFile("w", suffix=".nft", prefix="llmtap-") as rules:
                rules.write(render_ruleset(self.plan))
                rules.flush()
                session.run(f'include "{rules.name}"')
            if len(addresses):
                session.run(render_set_update(TargetAddresses(), addresses))
        except BaseException:
            session.close()
            raise
        self._session = session
        self._addresses = addresses

    def update_targets(self, addresses: TargetAddresses) -> None:
        if self._session is None:
            raise NftError("the redirect is not installed")
        commands = render_set_update(self._addresses, addresses)
        if commands:
            self._session.run(commands)
        self._addresses = addresses

    def remove(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def alive(self) -> bool:
        return self._session is not None and self._session.alive()

    def refused_connections(self) -> int:
        if self._session is None or not self.plan.max_connections_per_user:
            return 0
        listing = self.runner(["nft", "-j", "list", "counter", FAMILY, TABLE, "refused"])
        try:
            items = json.loads(listing.stdout)["nftables"]
            return int(next(i["counter"]["packets"] for i in items if "counter" in i))
        except (ValueError, KeyError, StopIteration, TypeError):
            return 0

    @classmethod
    def rules_present(cls) -> bool:
        if not shutil.which("nft"):
            return False
        listing = cls.runner(["nft", "list", "tables"])
        return f"table {FAMILY} {TABLE}" in listing.stdout.split("\n")

    @classmethod
    def cleanup_leftovers(cls) -> bool:
        """Deletes a table left by something other than a live owner (e.g. `nft -f` by hand)."""
        if not cls.rules_present():
            return False
        result = cls.runner(["nft", "delete", "table", FAMILY, TABLE])
        if not result.ok:
            if "Operation not permitted" in result.stderr:
                raise NftError(
                    f"table {FAMILY} {TABLE} is owned by a running process: another llmtap is "
                    "running (stop it first)"
                )
            raise NftError(result.stderr.strip().splitlines()[0])
        return True

