"""The macOS machine as install sees it: its paths (under `install.root`, so tests use a
temporary tree) and everything outside install's own files, injectable."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmtap.config import Config
from llmtap.install.linux_system import Layout
from llmtap.install.ready import port_in_use, wait_for_daemon
from llmtap.platform.base import ServiceManager
from llmtap.platform.macos import environment, launchd, pf
from llmtap.platform.runner import Runner, SubprocessRunner

SW_VERS = "/usr/bin/sw_vers"
MIN_MACOS = (11, 0)  # launchctl bootstrap/bootout/asuser and pfctl -E/-X as used here
ROOTS = "/etc/ssl/cert.pem"  # Apple's copy of the system roots, for the bundle Python reads
TOKEN_FILE = "/var/run/llmtap-pf.token"  # platform.macos.pf.PfBackend.token_file

CONFIG_TEMPLATE = """\
# llmtap configuration, written by `sudo llmtap install`. Every key is optional; the values
# shown are the defaults. After a change run `sudo llmtap install` again or restart the service
# (`sudo launchctl kickstart -k system/com.llmtap.daemon`).
#
# state_dir   = "/var/lib/llmtap"
# records_dir = "/var/lib/llmtap/records"
#
# [redirect]
# backend    = "auto"     # auto | pf
# scope      = "targets"  # targets | all
# ports      = [443]
# proxy_port = 8443
# block_quic = true
#
# [targets]
# extra_hosts = []        # more API hosts to tap (then: sudo llmtap ca rotate)
"""


def log_hint(config: Config) -> Callable[[ServiceManager], str]:
    def hint(_service: ServiceManager) -> str:
        return f"see {config.install.log_file} and `sudo launchctl print system/{launchd.LABEL}`"

    return hint


def wait_for_service(config: Config, service: ServiceManager) -> None:
    wait_for_daemon(config, service, log_hint(config))


@dataclass
class MacSystem:
    """Everything install touches outside its own files; tests replace parts of it."""

    runner: Runner = field(default_factory=SubprocessRunner)
    is_root: Callable[[], bool] = lambda: os.geteuid() == 0
    check_port: Callable[[int], None] = port_in_use
    wait_ready: Callable[[Config, ServiceManager], None] = wait_for_service


def parse_sw_vers(output: str) -> tuple[str, tuple[int, ...]]:
    """(`macOS 14.4.1`, (14, 4, 1)) from `sw_vers` (ProductName/ProductVersion lines)."""
    fields = dict(re.findall(r"^(\w+):\s*(.+?)\s*$", output, re.MULTILINE))
    version = fields.get("ProductVersion", "")
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    return f"{fields.get('ProductName', 'macOS')} {version}".strip(), numbers


@dataclass(frozen=True)
class MacPaths:
    """The macOS-only paths, as the system sees them and where they are written."""

    layout: Layout

    @property
    def daemon_plist_dir(self) -> Path:
        return self.layout.at(launchd.PLIST_DIR)

    @property
    def daemon_plist(self) -> Path:
        return self.daemon_plist_dir / f"{launchd.LABEL}.plist"

    @property
    def agent_plist(self) -> Path:
        return self.layout.at(environment.AGENT_DIR) / f"{environment.AGENT_LABEL}.plist"

    @property
    def shell_files(self) -> list[Path]:
        return [self.layout.at(name) for name in environment.SHELL_FILES]

    @property
    def token_file(self) -> Path:
        return self.layout.at(TOKEN_FILE)

    @property
    def roots(self) -> Path:
        return self.layout.at(ROOTS)


def pf_hooks_missing(runner: Runner) -> list[str]:
    """The `com.apple/*` anchor calls the main ruleset lacks (custom /etc/pf.conf)."""
    rules = runner(pf.show_command("rules", None))
    nat = runner(pf.show_command("nat", None))
    return pf.missing_hooks(rules.stdout if rules.ok else "", nat.stdout if nat.ok else "")
