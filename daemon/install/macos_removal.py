"""The macOS removals, tagged like the steps they undo. Each looks at the machine (and the
manifest), not at an install run, so it also cleans a half-installed machine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtap.ca import write_file
from llmtap.install import linux_removal
from llmtap.install.files import remove_data, remove_file, remove_run_dir
from llmtap.install.manifest import Manifest
from llmtap.platform.macos import environment
from llmtap.platform.macos.environment import GuiSession

if TYPE_CHECKING:
    from llmtap.install.macos import MacInstaller


def service(inst: MacInstaller) -> str | None:
    launchd = inst.service()
    if not (launchd.plist.exists() or launchd.is_running()):
        return None
    launchd.uninstall()  # bootout: SIGTERM, the daemon removes its rules and releases pf
    return f"stopped and removed the LaunchDaemon {launchd.plist}"


def rules(inst: MacInstaller) -> str | None:
    removed = inst.cleanup_pf()
    return f"removed what the daemon left in pf: {', '.join(removed)}" if removed else None


def gui_environment(inst: MacInstaller) -> str | None:
    removed = []
    if remove_file(inst.paths.agent_plist):
        removed.append(f"the LaunchAgent {inst.paths.agent_plist}")
    values = inst.env_values()
    uid = GuiSession(inst.system.runner).unset(list(values), values)
    if removed and uid is not None:
        removed.append(f"the variables of the console user's session (uid {uid})")
    return f"removed {' and '.join(removed)}" if removed else None


def shell_environment(inst: MacInstaller, manifest: Manifest) -> str | None:
    removed = []
    created = manifest.data.get("created_files", [])
    for path in inst.paths.shell_files:
        if not path.is_file() or not environment.has_block(text := path.read_text()):
            continue
        rest = environment.without_block(text)
        if not rest and str(path) in created:
            remove_file(path)
        else:
            st = path.stat()
            write_file(path, rest.encode(), st.st_mode & 0o7777, st.st_uid, st.st_gid)
        removed.append(str(path))
    return f"removed llmtap's block from {', '.join(removed)}" if removed else None


def keychain(inst: MacInstaller) -> str | None:
    if not inst.store.found():
        return None
    inst.store.untrust()
    return "removed the CA and its trust setting from the System keychain (by SHA-1)"


def java(inst: MacInstaller) -> str | None:
    holding = [store for store in inst.jdk_stores() if store.holds()]
    for store in holding:
        store.untrust()
    return (f"removed the CA from {len(holding)} JDK keystore(s): "
            f"{', '.join(str(store.home) for store in holding)}") if holding else None


def public_files(inst: MacInstaller) -> str | None:
    return linux_removal.public_files(inst)


def run_dir(inst: MacInstaller) -> str | None:
    return remove_run_dir(inst.config.run_dir,
                          ("control.sock", "llmtap.pid", "upstream-ca.pem", "natlook.sock"))


def data(inst: MacInstaller) -> str | None:
    return remove_data(inst.config, inst.layout.log_file)


def config_file(inst: MacInstaller, manifest: Manifest) -> str | None:
    return linux_removal.config_file(inst, manifest)


def account(inst: MacInstaller, manifest: Manifest) -> str | None:
    name = inst.account.name
    if manifest.data.get("created_user") != name:
        if inst.directory.lookup(inst.account) is not None:
            inst.report(f"kept user {name}: `llmtap install` did not create it")
        return None
    messages = []
    if inst.directory.delete(inst.account.user):
        messages.append(f"deleted user {name}")
    if manifest.data.get("created_group") and inst.directory.delete(inst.account.group):
        messages.append(f"deleted group {name}")
    return "; ".join(messages) or None
