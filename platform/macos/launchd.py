"""macOS service: a launchd daemon in /Library/LaunchDaemons, started at boot and kept alive."""

from __future__ import annotations

import contextlib
import os
import plistlib
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from llmtap.atomic import write_atomic
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.base import ServiceManager
from llmtap.platform.runner import Runner, SubprocessRunner

LAUNCHCTL = "/bin/launchctl"
LABEL = "com.llmtap.daemon"
PLIST_DIR = Path("/Library/LaunchDaemons")
LOG_FILE = "/var/log/llmtap.log"
DOMAIN = "system"


def render_plist(command: list[str], label: str = LABEL, log_file: str = LOG_FILE) -> bytes:
    """installers/com.llmtap.daemon.plist for this command, label and log."""
    text = resources.files("llmtap.installers").joinpath(f"{LABEL}.plist").read_bytes()
    definition: dict[str, Any] = plistlib.loads(text)
    definition.update(Label=label, ProgramArguments=list(command), StandardOutPath=log_file,
                      StandardErrorPath=log_file)
    return plistlib.dumps(definition, fmt=plistlib.FMT_XML, sort_keys=True)


def parse_print_state(output: str) -> str | None:
    """The `state = ...` of `launchctl print system/<label>` (running, waiting, ...)."""
    match = re.search(r"^\s*state = (.+?)\s*$", output, re.MULTILINE)
    return match.group(1) if match else None


class LaunchdService(ServiceManager):
    name = "launchd"

    def __init__(
        self, runner: Runner | None = None, label: str = LABEL, plist_dir: Path = PLIST_DIR,
        log_file: str = LOG_FILE,
    ) -> None:
        self.runner = runner or SubprocessRunner()
        self.label = label
        self.log_file = log_file
        self.plist = plist_dir / f"{label}.plist"

    @property
    def target(self) -> str:
        return f"{DOMAIN}/{self.label}"

    @classmethod
    def available(cls) -> bool:
        return sys.platform == "darwin" and os.path.exists(LAUNCHCTL)

    def install(self, command: list[str]) -> None:
        self._write_plist(render_plist(command, self.label, self.log_file))
        self.stop()  # a reinstall replaces the loaded definition
        self._launchctl("bootstrap", DOMAIN, str(self.plist))

    def uninstall(self) -> None:
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            self.plist.unlink()

    def start(self) -> None:
        if not self._loaded():
            self._launchctl("bootstrap", DOMAIN, str(self.plist))
        self._launchctl("kickstart", self.target)

    def stop(self) -> None:
        """bootout: with KeepAlive a plain kill would only restart it."""
        if self._loaded():
            self._launchctl("bootout", self.target)

    def is_running(self) -> bool:
        result = self.runner([LAUNCHCTL, "print", self.target])
        return result.ok and parse_print_state(result.stdout) == "running"

    def _loaded(self) -> bool:
        return self.runner([LAUNCHCTL, "print", self.target]).ok

    def _launchctl(self, *args: str) -> None:
        result = self.runner([LAUNCHCTL, *args])
        if not result.ok:
            reason = result.reason()
            if "not permitted" in reason or "Permission denied" in reason:
                raise UsageError(f"launchctl {args[0]} needs root: run it with sudo")
            raise RuntimeFailure(f"launchctl {args[0]} failed: {reason}")

    def _write_plist(self, data: bytes) -> None:
        """Atomically, 0644 and (as root) root:wheel: launchd ignores a plist others can write."""
        self.plist.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.plist, data, 0o644, (0, 0) if os.geteuid() == 0 else None)
