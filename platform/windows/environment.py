"""Windows: machine-wide environment variables (what /etc/profile.d and environment.d are on
Linux), for the runtimes that do not read the Windows certificate store (Node, Python SDKs)."""

from __future__ import annotations

import re

from llmtap.errors import RuntimeFailure
from llmtap.platform.runner import Runner, SubprocessRunner

ENV_KEY = r"HKLM\SYSTEM\CurrentControlSet\Control\Session Manager\Environment"
VALUE_LINE = re.compile(r"^\s+(\S+)\s+REG_(?:EXPAND_)?SZ\s+(.*?)\s*$")


def set_command(name: str, value: str) -> list[str]:
    # setx (not `reg add`) also tells running programs, Explorer first, that it changed.
    return ["setx", name, value, "/M"]


def query_command(name: str) -> list[str]:
    return ["reg", "query", ENV_KEY, "/v", name]


def delete_command(name: str) -> list[str]:
    return ["reg", "delete", ENV_KEY, "/v", name, "/f"]


def parse_query(output: str, name: str) -> str | None:
    """The value in `reg query`'s answer ("    NAME    REG_SZ    value")."""
    for line in output.splitlines():
        match = VALUE_LINE.match(line)
        if match and match.group(1).upper() == name.upper():
            return match.group(2)
    return None


class MachineEnvironment:
    def __init__(self, runner: Runner | None = None) -> None:
        self.runner = runner or SubprocessRunner()

    def get(self, name: str) -> str | None:
        result = self.runner(query_command(name))
        return parse_query(result.stdout, name) if result.ok else None

    def set(self, name: str, value: str) -> None:
        result = self.runner(set_command(name, value))
        if not result.ok:
            raise RuntimeFailure(f"setx {name} failed: {result.reason()}")

    def delete(self, name: str) -> None:
        if self.get(name) is None:
            return
        result = self.runner(delete_command(name))
        if not result.ok:
            raise RuntimeFailure(f"removing the machine variable {name} failed: {result.reason()}")
