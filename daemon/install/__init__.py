"""`llmtap install`, `uninstall` and `ca rotate`: one engine, one provider of steps per OS.

The engine (engine.py) applies a provider's steps in order, skips the ones already done, records
what uninstall cannot tell by looking (manifest.py) and rolls back on a failure; uninstall runs the
provider's removals, each tagged like the step it undoes. A provider (linux.py, windows.py,
macos.py) says which steps its OS needs; `provider_for` picks it at run time. Every command goes
through an injectable Runner, so each provider is tested on any OS.
"""

from __future__ import annotations

import sys

from llmtap.config import Config
from llmtap.install.engine import Provider, Report


def provider_for(config: Config, explicit: str | None, report: Report = print,
                 platform: str | None = None) -> Provider:
    """The installer for this OS (or `platform`, as sys.platform spells it)."""
    name = platform or sys.platform
    if name == "win32":
        from llmtap.install.windows import WindowsInstaller

        return WindowsInstaller(config, explicit, report=report)
    if name == "darwin":
        from llmtap.install.macos import MacInstaller

        return MacInstaller(config, explicit, report=report)
    from llmtap.install.linux import LinuxInstaller

    return LinuxInstaller(config, explicit, report=report)
