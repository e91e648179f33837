"""The Windows service as `sc.exe` reports it: `sc query` (its state) and `sc qc` (its config).

Parsed by field name and numeric code, which sc.exe prints the same in every display language."""

from __future__ import annotations

import re

from llmtap.platform.runner import Runner, SubprocessRunner

SC = "sc.exe"
ERROR_SERVICE_DOES_NOT_EXIST = 1060
FIELD = re.compile(r"^\s*([A-Z_]+)\s*:\s*(.*?)\s*$")
STATES = {1: "STOPPED", 2: "START_PENDING", 3: "STOP_PENDING", 4: "RUNNING",
          5: "CONTINUE_PENDING", 6: "PAUSE_PENDING", 7: "PAUSED"}


def query_command(name: str) -> list[str]:
    return [SC, "query", name]


def config_command(name: str) -> list[str]:
    return [SC, "qc", name]


def parse_fields(output: str) -> dict[str, str]:
    """`LABEL : value` lines (continuation lines, like the accepted controls, are skipped)."""
    fields: dict[str, str] = {}
    for line in output.splitlines():
        if match := FIELD.match(line):
            fields.setdefault(match.group(1), match.group(2))
    return fields


def parse_state(output: str) -> str | None:
    """RUNNING, STOPPED, ... from `sc query` (None when it names no state)."""
    code = parse_fields(output).get("STATE", "").split(" ", 1)[0]
    return STATES.get(int(code)) if code.isdigit() else None


class ScQuery:
    def __init__(self, name: str, runner: Runner | None = None) -> None:
        self.name = name
        self.runner = runner or SubprocessRunner()

    def state(self) -> str | None:
        """None when the service does not exist (or sc.exe could not say)."""
        result = self.runner(query_command(self.name))
        return parse_state(result.stdout) if result.ok else None

    def config(self) -> dict[str, str]:
        result = self.runner(config_command(self.name))
        return parse_fields(result.stdout) if result.ok else {}
