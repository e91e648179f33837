"""The Linux removals, tagged like the steps they undo. Each looks at the machine (and the
manifest), not at an install run, so it also cleans a half-installed machine."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from llmtap.errors import RuntimeFailure, UsageError
from llmtap.install.files import remove_data, remove_file, remove_run_dir
from llmtap.install.host import Host
from llmtap.install.manifest import Manifest
from llmtap.platform.linux.app_trust import NssTrustStore
from llmtap.platform.linux.systemd import SystemdService
from llmtap.platform.linux.users import group_exists, lookup_user, prefix

if TYPE_CHECKING:
    from llmtap.install.linux import LinuxInstaller


def services(inst: LinuxInstaller) -> str | None:
    removed = []
    systemd = inst.service("systemd")
    assert isinstance(systemd, SystemdService)
    if systemd.unit_file.exists():
        systemd.uninstall()
        removed.append(f"removed the systemd service {systemd.unit_file}")
    detached = inst.service("detached")
    if detached.is_running():
        detached.uninstall()
        removed.append("stopped the detached llmtap service")
    remove_file(inst.layout.keeper_pidfile)
    return "; ".join(removed) or None


def rules(inst: LinuxInstaller) -> str | None:
    removed = inst.system.cleanup_rules()
    return f"removed llmtap rules ({', '.join(removed)})" if removed else None


def environment(inst: LinuxInstaller) -> str | None:
    paths = [inst.layout.profile_script, inst.layout.environment_file]
    removed = [str(p) for p in paths if remove_file(p)]
    return f"removed {', '.join(removed)}" if removed else None


def java(inst: LinuxInstaller) -> str | None:
    java = inst.java_store()
    if java is None or not java.holds():
        return None
    java.untrust()
    return f"removed the CA from Java's keystore {java.keystore}"


def nss(inst: LinuxInstaller) -> str | None:
    nss = inst.nss_store()
    holders = nss.holders() if nss else []
    if not nss or not holders:
        return None
    NssTrustStore(holders, inst.system.runner).untrust()
    return f"removed the CA from {len(holders)} NSS database(s)"


def os_trust(inst: LinuxInstaller, manifest: Manifest) -> str | None:
    try:
        store = inst.trust_store()
    except UsageError:
        recorded = manifest.data.get("trust")
        if not recorded:
            return None  # an unknown distribution was never trusted by us
        family = {"DebianTrustStore": "debian", "FedoraTrustStore": "fedora",
                  "ArchTrustStore": "arch"}.get(recorded, "auto")
        store = inst.trust_store(family)
    if not store.is_anchored():
        return None
    store.untrust()
    return f"removed the CA from the OS store ({store.name})"


def public_files(inst: Host) -> str | None:
    removed = [p for p in (inst.layout.public_cert, inst.layout.public_bundle) if remove_file(p)]
    with contextlib.suppress(OSError):
        inst.layout.public_dir.rmdir()  # only when empty: the config may live there
    return f"removed {', '.join(map(str, removed))}" if removed else None


def run_dir(inst: LinuxInstaller) -> str | None:
    return remove_run_dir(inst.config.run_dir,
                          ("control.sock", "llmtap.pid", "upstream-ca.pem", "service.pid"))


def data(inst: LinuxInstaller) -> str | None:
    return remove_data(inst.config, inst.layout.log_file)


def config_file(inst: Host, manifest: Manifest) -> str | None:
    created = manifest.data.get("created_config")
    if not created or Path(created) != inst.layout.config_file_real:
        return None  # the user's own file: never ours to delete
    if not remove_file(inst.layout.config_file):
        return None
    with contextlib.suppress(OSError):
        inst.layout.config_file.parent.rmdir()
    return f"deleted {created}"


def user(inst: LinuxInstaller, manifest: Manifest) -> str | None:
    name, root = inst.config.service_user, inst.layout.root
    if not manifest.data.get("created_user"):
        if lookup_user(root, name) is not None:
            inst.report(f"kept user {name}: `llmtap install` did not create it")
        return None
    messages = []
    if lookup_user(root, name) is not None:
        result = inst.system.runner(["userdel", *prefix(root), name])
        if not result.ok:
            raise RuntimeFailure(f"userdel failed: {result.reason()}")
        messages.append(f"deleted user {name}")
    if group_exists(root, name):
        result = inst.system.runner(["groupdel", *prefix(root), name])
        if not result.ok:
            raise RuntimeFailure(f"groupdel failed: {result.reason()}")
        messages.append(f"deleted group {name}")
    return "; ".join(messages) or None
