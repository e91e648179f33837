"""Windows Firewall: an inbound block rule on the proxy's port that llmtap owns (netsh advfirewall).

The proxy listens on 127.0.0.1 and ::1 only (llmtap.platform.windows.loopback), so no remote host
can reach it; this rule is the second wall, should a listener ever be bound wider (the explicit
proxy's address, a hand-edited config). Windows Firewall does not filter loopback traffic, so the
rule never touches the redirected connections. The rule is found and removed by its name, which
only llmtap uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmtap.errors import RuntimeFailure
from llmtap.platform.runner import Runner, SubprocessRunner

RULE_NAME = "llmtap-proxy-block-remote"
DESCRIPTION = "llmtap: no remote host may reach the local proxy (added by llmtap install)"


def add_command(port: int) -> list[str]:
    return ["netsh", "advfirewall", "firewall", "add", "rule", f"name={RULE_NAME}", "dir=in",
            "action=block", "protocol=TCP", f"localport={port}", "remoteip=any", "profile=any",
            "enable=yes", f"description={DESCRIPTION}"]


def show_command() -> list[str]:
    return ["netsh", "advfirewall", "firewall", "show", "rule", f"name={RULE_NAME}"]


def delete_command() -> list[str]:
    return ["netsh", "advfirewall", "firewall", "delete", "rule", f"name={RULE_NAME}"]


@dataclass(frozen=True)
class Rule:
    fields: dict[str, str]

    def blocks_remote(self, port: int) -> bool:
        """Enabled, inbound, blocking TCP to `port` from any address, in every profile."""
        f = self.fields
        profiles = {p.strip().lower() for p in f.get("Profiles", "").split(",")}
        return (f.get("Enabled") == "Yes" and f.get("Direction") == "In"
                and f.get("Action") == "Block" and f.get("Protocol") == "TCP"
                and f.get("LocalPort") == str(port) and f.get("RemoteIP") == "Any"
                and profiles == {"domain", "private", "public"})


def parse_rules(output: str) -> list[Rule]:
    """`show rule`'s blocks ("Rule Name:  x", a dashed line, "Key:  value" lines)."""
    rules: list[dict[str, str]] = []
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if not sep or line.startswith(" ") or set(line.strip()) == {"-"}:
            continue
        if key == "Rule Name":
            rules.append({})
        if rules:
            rules[-1][key.strip()] = value.strip()
    return [Rule(r) for r in rules]


class FirewallRule:
    def __init__(self, runner: Runner | None = None) -> None:
        self.runner = runner or SubprocessRunner()

    def rules(self) -> list[Rule]:
        result = self.runner(show_command())  # "No rules match" is exit code 1
        return parse_rules(result.stdout) if result.ok else []

    def present(self) -> bool:
        return bool(self.rules())

    def in_place(self, port: int) -> bool:
        rules = self.rules()
        return len(rules) == 1 and rules[0].blocks_remote(port)

    def add(self, port: int) -> None:
        self.remove()  # one rule, ours, exactly as written here
        result = self.runner(add_command(port))
        if not result.ok:
            raise RuntimeFailure(f"netsh could not add the firewall rule: {result.reason()}")

    def remove(self) -> None:
        if not self.present():
            return
        result = self.runner(delete_command())
        if not result.ok:
            raise RuntimeFailure(f"netsh could not delete the firewall rule: {result.reason()}")
