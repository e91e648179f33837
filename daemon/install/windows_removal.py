"""The Windows removals, tagged like the steps they undo (llmtap.install.windows). Each looks at
the machine (and the manifest), not at an install run, so it also cleans a half-installed machine."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from llmtap.install import files
from llmtap.install.manifest import Manifest
from llmtap.platform.windows.firewall import RULE_NAME
from llmtap.platform.windows.service import WindowsService

if TYPE_CHECKING:
    from llmtap.install.windows import WindowsInstaller


def services(inst: WindowsInstaller, manifest: Manifest) -> str | None:
    service = inst.service()
    if manifest.data.get("service") is None and not service.is_running():
        return None
    service.uninstall()
    kind = "service" if service.name == WindowsService.name else "scheduled task"
    return f"removed the llmtap {kind}"


def rules(inst: WindowsInstaller) -> str | None:
    removed = inst.system.cleanup_rules()
    return f"removed llmtap rules ({', '.join(removed)})" if removed else None


def environment(inst: WindowsInstaller) -> str | None:
    ours = [name for name, value in inst.env().items() if inst.environment.get(name) == value]
    for name in ours:  # a value someone changed since is theirs now
        inst.environment.delete(name)
    return f"removed the machine variables {', '.join(ours)}" if ours else None


def firewall(inst: WindowsInstaller) -> str | None:
    if not inst.firewall.present():
        return None
    inst.firewall.remove()
    return f"removed the firewall rule {RULE_NAME}"


def os_trust(inst: WindowsInstaller) -> str | None:
    if not inst.store.present():
        return None
    inst.store.untrust()
    return "removed the CA from the machine's Root store (certutil)"


def public_files(inst: WindowsInstaller) -> str | None:
    removed = [p for p in (inst.public_cert, inst.public_bundle) if files.remove_file(p)]
    with contextlib.suppress(OSError):
        inst.config.install.public_dir.rmdir()
    return f"removed {', '.join(map(str, removed))}" if removed else None


def run_dir(inst: WindowsInstaller) -> str | None:
    return files.remove_run_dir(inst.config.run_dir, ("status.json", "llmtap.pid", "upstream-ca.pem"))


def data(inst: WindowsInstaller) -> str | None:
    return files.remove_data(inst.config, inst.config.install.log_file)


def config_file(inst: WindowsInstaller, manifest: Manifest) -> str | None:
    created = manifest.data.get("created_config")
    if not created or Path(created) != inst.config_file or not files.remove_file(inst.config_file):
        return None  # the user's own file: never ours to delete
    with contextlib.suppress(OSError):
        inst.config_file.parent.rmdir()
    return f"deleted {created}"
