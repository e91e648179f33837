"""The one way platform code runs a command: injectable, so tests assert the exact argv lists.

A command runs to completion through a Runner; a long-lived one that takes commands on its stdin
(`nft -i`, whose netlink socket owns llmtap's table for as long as it lives) is started through
a Starter."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

# macOS pfctl prints these on every run on a kernel without ALTQ; they are never the reason for a
# failure (and never appear in any other tool's output).
NOISE = ("No ALTQ support in kernel", "ALTQ related functions disabled")


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def output(self) -> str:
        """stdout and stderr together: pfctl prints some results (the -E token) on stderr."""
        return f"{self.stdout}\n{self.stderr}"

    def reason(self, noise: Iterable[str] = NOISE) -> str:
        """The first meaningful line of the complaint, for a one-line error message."""
        skip = tuple(noise)
        for line in (self.stderr + "\n" + self.stdout).splitlines():
            line = line.strip()
            if line and not line.startswith(skip):
                return line
        return f"exit code {self.returncode}"


class Runner(Protocol):
    def __call__(self, argv: list[str], stdin: str | None = None) -> Completed: ...


class SubprocessRunner:
    """Runs the command for real. A missing binary or a hang is a result, never an exception."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s

    def __call__(self, argv: list[str], stdin: str | None = None) -> Completed:
        try:  # errors="replace": certutil and schtasks print in the console code page
            proc = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, errors="replace",
                timeout=self.timeout_s,
            )
        except FileNotFoundError:
            return Completed(127, "", f"{argv[0]}: not found")
        except subprocess.TimeoutExpired:
            return Completed(124, "", f"{argv[0]} did not answer within {self.timeout_s:g}s")
        return Completed(proc.returncode, proc.stdout, proc.stderr)


class Starter(Protocol):
    def __call__(self, argv: list[str], preexec: Callable[[], None] | None = None
                 ) -> subprocess.Popen[str]: ...


def start_interactive(argv: list[str], preexec: Callable[[], None] | None = None
                      ) -> subprocess.Popen[str]:
    """A long-lived command fed line by line on stdin, answering on stderr (stdout is dropped);
    `preexec` runs in the child before it starts (e.g. to die with its parent)."""
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, bufsize=1, preexec_fn=preexec)
