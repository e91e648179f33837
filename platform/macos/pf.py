"""macOS pf redirect: llmtap's own anchor beneath the stock `com.apple/*` anchors.

The stock /etc/pf.conf evaluates every child of `com.apple` (`rdr-anchor "com.apple/*"` and
`anchor "com.apple/*"`), so loading rules into `com.apple/llmtap` makes them live without touching
the user's main ruleset. Outbound TCP to the targets (or to anything but this machine, with
scope = all) from any user but the service's is routed to lo0, where `rdr` sends it to the proxy;
the proxy finds the original destination in the pf state table (see natlook.py).

pf is enabled with `pfctl -E`, which returns a reference token; `pfctl -X token` releases only our
reference, so a pf that someone else enabled stays on. The token is also written to a file so the
guardian (or the next start) can release it after a crash: pf rules do not die with the process.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from llmtap.errors import RuntimeFailure
from llmtap.platform.base import OriginalAddrLookup, RedirectBackend, RedirectPlan, TargetAddresses
from llmtap.platform.macos.natlook import NatLook, NatLookChannel
from llmtap.platform.runner import Completed, Runner, SubprocessRunner

PFCTL = "/sbin/pfctl"
PARENT_ANCHOR = "com.apple"
ANCHOR = f"{PARENT_ANCHOR}/llmtap"
TABLE4 = "llmtap_targets4"
TABLE6 = "llmtap_targets6"
SELF_TABLE = "llmtap_self"
LOOPBACK = {"inet": "127.0.0.1", "inet6": "::1"}
QUIC_PORT = 443
ALIVE_INTERVAL_S = 5.0  # alive() runs pfctl; the supervisor asks five times a second

Endpoint = tuple[str, int]


class PfError(RuntimeFailure):
    """pfctl refused; the message is pfctl's own first error line."""


# --- rendering (pure, golden-tested) ---------------------------------------------------------


def render_ruleset(plan: RedirectPlan, addresses: TargetAddresses) -> str:
    """The whole anchor, loaded in one `pfctl -f` transaction (all of it or nothing)."""
    lines = [
        f"# llmtap {plan.scope} redirect; removed with: pfctl -a {ANCHOR} -F all",
        _table(TABLE4, addresses.v4),
        _table(TABLE6, addresses.v6),
    ]
    if plan.scope == "all":
        # A table, not `! self` inline: a negated list of several addresses matches everything.
        lines.append(f"table <{SELF_TABLE}> const {{ self }}")
    ports = _ports(plan.ports)
    for af, table in (("inet", TABLE4), ("inet6", TABLE6)):
        dest = f"! <{SELF_TABLE}>" if plan.scope == "all" else f"<{table}>"
        lines.append(
            f"rdr pass on lo0 {af} proto tcp from any to {dest} port {ports} "
            f"-> {LOOPBACK[af]} port {plan.proxy_port}"
        )
    for af, table in (("inet", TABLE4), ("inet6", TABLE6)):
        dest = f"! <{SELF_TABLE}>" if plan.scope == "all" else f"<{table}>"
        # `quick`: a later rule of the main ruleset must not undo the route-to.
        lines.append(
            f"pass out quick route-to (lo0 {LOOPBACK[af]}) {af} proto tcp from any to {dest} "
            f"port {ports} user != {plan.service_uid} keep state"
        )
    if plan.block_quic:
        for af, table in (("inet", TABLE4), ("inet6", TABLE6)):
            lines.append(
                f"block return out quick {af} proto udp from any to <{table}> port {QUIC_PORT} "
                f"user != {plan.service_uid}"
            )
    return "\n".join(lines) + "\n"


def _table(name: str, addresses: Iterable[str]) -> str:
    ordered = sorted(addresses, key=ipaddress.ip_address)
    body = f" {{ {', '.join(ordered)} }}" if ordered else ""
    return f"table <{name}> persist{body}"


def _ports(ports: tuple[int, ...]) -> str:
    if len(ports) == 1:
        return str(ports[0])
    return "{ " + ", ".join(str(p) for p in ports) + " }"


def load_command() -> list[str]:
    return [PFCTL, "-a", ANCHOR, "-f", "-"]


def flush_command() -> list[str]:
    # With -a, `-F all` clears only the anchor's rules, nat and tables, never the global states.
    return [PFCTL, "-a", ANCHOR, "-F", "all"]


def enable_command() -> list[str]:
    return [PFCTL, "-E"]


def release_command(token: str) -> list[str]:
    return [PFCTL, "-X", token]


def show_command(what: str, anchor: str | None = ANCHOR) -> list[str]:
    """`what` is rules, nat, info or state."""
    return [PFCTL, *(["-a", anchor] if anchor else []), "-s", what]


# --- parsing of pfctl output (pure, tested on saved outputs) -----------------------------------


def parse_token(output: str) -> str | None:
    """The reference token `pfctl -E` prints as `Token : 1234...`."""
    match = re.search(r"^Token\s*:\s*(\d+)\s*$", output, re.MULTILINE)
    return match.group(1) if match else None


def parse_rules(output: str) -> list[str]:
    """The rule lines of `pfctl -s rules` / `-s nat` (comments and ALTQ chatter dropped)."""
    return [
        line.strip() for line in output.splitlines()
        if line.strip() and not line.startswith(("#", "No ALTQ", "ALTQ"))
    ]


def missing_hooks(main_rules: str, main_nat: str) -> list[str]:
    """The `com.apple/*` anchor calls our anchor needs that the main ruleset lacks."""
    missing = []
    if not any(r.startswith(f'rdr-anchor "{PARENT_ANCHOR}/*"') for r in parse_rules(main_nat)):
        missing.append(f'rdr-anchor "{PARENT_ANCHOR}/*"')
    if not any(r.startswith(f'anchor "{PARENT_ANCHOR}/*"') for r in parse_rules(main_rules)):
        missing.append(f'anchor "{PARENT_ANCHOR}/*"')
    return missing


def pf_enabled(info: str) -> bool:
    return re.search(r"^Status:\s*Enabled\b", info, re.MULTILINE) is not None


@dataclass(frozen=True)
class PfState:
    """One line of `pfctl -s state`.

    Hosts read left to right as printed: for `->` (outbound) `lan [-> gwy] -> ext`, for `<-`
    (inbound, e.g. our rdr on lo0) `lan [<- gwy] <- ext`, where gwy is the address before
    translation. FreeBSD prints the middle host in parentheses instead; both are accepted.
    """

    interface: str
    proto: str
    direction: str  # "->" or "<-"
    hosts: tuple[Endpoint, ...]
    state: str

    @property
    def source(self) -> Endpoint:
        return self.hosts[0] if self.direction == "->" else self.hosts[-1]

    @property
    def destination(self) -> Endpoint:
        """Where the initiator sent its packets (before any rdr)."""
        if self.direction == "->":
            return self.hosts[-1]
        return self.hosts[1] if len(self.hosts) == 3 else self.hosts[0]


def parse_endpoint(text: str) -> Endpoint:
    """`1.2.3.4:443` (IPv4) or `2001:db8::1[443]` (IPv6), as pfctl prints them."""
    text = text.strip("()")
    if text.endswith("]"):
        address, _, port = text[:-1].rpartition("[")
    else:
        address, _, port = text.rpartition(":")
    return str(ipaddress.ip_address(address)), int(port)


def parse_states(output: str) -> list[PfState]:
    states = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[2] in ("->", "<-"):
            continue
        arrows = {f for f in fields if f in ("->", "<-")}
        if len(arrows) != 1:
            continue
        try:
            hosts = tuple(parse_endpoint(f) for f in fields[2:-1] if f not in arrows)
        except ValueError:
            continue  # icmp ids, unparsable lines: not ours
        if 2 <= len(hosts) <= 3:
            states.append(PfState(fields[0], fields[1], arrows.pop(), hosts, fields[-1]))
    return states


def original_destination(states: Iterable[PfState], client: Endpoint) -> Endpoint | None:
    """The original destination of the redirected TCP connection from `client`.

    The rdr state on lo0 names it directly (gwy); the route-to state is the fallback.
    """
    client = (str(ipaddress.ip_address(client[0])), client[1])
    fallback = None
    for st in states:
        if st.proto != "tcp" or st.source != client:
            continue
        if st.direction == "<-" and len(st.hosts) == 3:
            return st.destination
        if st.direction == "->" and fallback is None:
            fallback = st.destination
    return fallback


# --- the backend --------------------------------------------------------------------------------


class PfBackend(RedirectBackend):
    name = "pf"
    dies_with_owner = False  # the supervisor's guardian and every start clean up after a crash

    runner: ClassVar[Runner] = SubprocessRunner()
    token_file: ClassVar[Path] = Path("/var/run/llmtap-pf.token")  # /var/run is wiped at boot

    def __init__(self, plan: RedirectPlan) -> None:
        super().__init__(plan)
        self.clock: Callable[[], float] = time.monotonic
        self._token: str | None = None
        self._installed = False
        self._checked_at = float("-inf")
        self._alive = False

    @classmethod
    def available(cls) -> bool:
        return sys.platform == "darwin" and os.path.exists(PFCTL)

    def install(self, addresses: TargetAddresses) -> None:
        self.cleanup_leftovers()
        self._require_hooks()
        try:
            self._load(addresses)
            self._enable()
        except BaseException:
            self.cleanup_leftovers()
            raise
        self._installed = True
        self._alive = True
        self._checked_at = self.clock()

    def update_targets(self, addresses: TargetAddresses) -> None:
        if not self._installed:
            raise PfError("the redirect is not installed")
        self._load(addresses)  # one transaction: the anchor with its new tables

    def remove(self) -> None:
        if not self._installed:
            return
        self.runner(flush_command())
        if self._token is not None:
            self.runner(release_command(self._token))
        with contextlib.suppress(FileNotFoundError):
            self.token_file.unlink()
        self._installed = False
        self._token = None

    def alive(self) -> bool:
        if not self._installed:
            return False
        now = self.clock()
        if now - self._checked_at >= ALIVE_INTERVAL_S:
            self._checked_at = now
            self._alive = self._rules_live()
        return self._alive

    def original_addr_lookup(self) -> OriginalAddrLookup:
        """DIOCNATLOOK on /dev/pf: works in a root process only (see original_addr_channel)."""
        return NatLook().original_addr

    @classmethod
    def original_addr_channel(cls) -> NatLookChannel:
        return NatLookChannel()

    @classmethod
    def redirected_connections(cls) -> list[PfState]:
        """The connections our rdr holds now, from `pfctl -s state`: for status and doctor,
        never per connection (the proxy uses DIOCNATLOOK)."""
        return [
            st for st in parse_states(cls._show("state", None))
            if st.direction == "<-" and len(st.hosts) == 3 and st.hosts[0][0] in LOOPBACK.values()
        ]

    @classmethod
    def rules_present(cls) -> bool:
        return any(parse_rules(cls._show(what)) for what in ("nat", "rules"))

    @classmethod
    def cleanup_leftovers(cls) -> bool:
        removed = cls.rules_present()
        if removed:
            result = cls.runner(flush_command())
            if cls.rules_present():
                raise PfError(f"could not flush the pf anchor {ANCHOR}: {result.reason()}")
        return cls._release_saved_token() or removed

    # --- helpers ---

    @classmethod
    def _show(cls, what: str, anchor: str | None = ANCHOR) -> str:
        result = cls.runner(show_command(what, anchor))
        return result.stdout if result.ok else ""

    def _require_hooks(self) -> None:
        missing = missing_hooks(self._show("rules", None), self._show("nat", None))
        if missing:
            raise PfError(
                f"the main pf ruleset does not call {' and '.join(missing)} (custom "
                "/etc/pf.conf?): add them back, then `sudo pfctl -f /etc/pf.conf`"
            )

    def _load(self, addresses: TargetAddresses) -> None:
        result = self.runner(load_command(), render_ruleset(self.plan, addresses))
        _check(result, "loading the pf rules")

    def _enable(self) -> None:
        result = self.runner(enable_command())
        token = parse_token(result.output) if result.ok else None
        if token is None:
            _check(result, "enabling pf")
            raise PfError("pfctl -E did not return a reference token")
        self._token = token
        self.token_file.write_text(token + "\n")

    def _rules_live(self) -> bool:
        return pf_enabled(self._show("info", None)) and bool(parse_rules(self._show("nat")))

    @classmethod
    def _release_saved_token(cls) -> bool:
        """Releases the pf reference of an earlier run (or ours); True if there was one."""
        try:
            token = cls.token_file.read_text().strip()
        except FileNotFoundError:
            return False
        if token.isdigit():
            cls.runner(release_command(token))  # a stale token (after a reboot) is simply refused
        with contextlib.suppress(FileNotFoundError):
            cls.token_file.unlink()
        return True


def _check(result: Completed, doing: str) -> None:
    if not result.ok:
        raise PfError(f"{doing} failed: {result.reason()}")
