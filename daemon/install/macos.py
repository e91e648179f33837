"""The macOS provider: refuses, before any change, until its steps are written.

What it will provide, on the same engine and in this order (the pieces exist under
platform/macos/): a hidden service user (dscl), the state, records and run directories, the default
config, the CA and its public copy and bundle, trust in the System keychain (platform.macos.trust),
the environment for runtimes that ignore the keychain (a profile script; launchctl setenv and a
LaunchAgent for GUI apps), the LaunchDaemon (platform.macos.launchd; pf is loaded by the daemon, see
platform.macos.pf) and the install record. Each step is a Step in install_steps and each removal
a Removal in removals, tagged alike, as linux.py does.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from llmtap.config import Config
from llmtap.errors import UsageError
from llmtap.install.engine import Removal, Report, Step
from llmtap.install.manifest import Manifest

UNSUPPORTED = ("`llmtap {action}` does not support macOS yet: its trust, pf and launchd pieces "
               "are not assembled into an install")


class MacInstaller:
    def __init__(self, config: Config, explicit_config: str | None = None,
                 is_root: Callable[[], bool] = lambda: os.geteuid() == 0,
                 report: Report = print) -> None:
        self.config = config
        self.explicit_config = explicit_config
        self.is_root = is_root
        self.report = report

    def preflight(self, action: str) -> None:
        """Every refusal happens here, before the first change."""
        if not self.is_root():
            raise UsageError(f"llmtap {action} needs root: run it with sudo")
        raise UsageError(UNSUPPORTED.format(action=action))

    def install_steps(self, manifest: Manifest) -> list[Step]:
        return []

    def removals(self, manifest: Manifest, purge: bool) -> list[Removal]:
        return []

    def install(self, trust: bool = True, service: bool = True) -> list[str]:
        self.preflight("install")
        return []

    def uninstall(self, purge: bool = False) -> list[str]:
        self.preflight("uninstall")
        return []

    def rotate(self) -> None:
        self.preflight("ca rotate")
