"""The Linux install steps, in the order LinuxInstaller.install_steps lists them. Each builds one
Step: whether it is needed, the change, and its undo; what uninstall must know later goes into the
manifest."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from llmtap import ca
from llmtap.errors import RuntimeFailure
from llmtap.install.engine import Step
from llmtap.install.files import FileChange, make_dirs, remove_dirs, remove_file
from llmtap.install.host import Host
from llmtap.install.linux_system import CONFIG_TEMPLATE
from llmtap.install.manifest import Manifest
from llmtap.install.runtime_env import env_values
from llmtap.platform.linux.app_trust import JavaTrustStore, NssTrustStore
from llmtap.platform.linux.keeper import DetachedService
from llmtap.platform.linux.systemd import SystemdService
from llmtap.platform.linux.trust import DistroTrustStore
from llmtap.platform.linux.users import group_exists, lookup_user, prefix, useradd_command

if TYPE_CHECKING:
    from llmtap.install.linux import LinuxInstaller


def user_step(inst: LinuxInstaller, manifest: Manifest) -> Step:
    name, root = inst.config.service_user, inst.layout.root
    runner = inst.system.runner
    created_group = [False]

    def apply() -> str:
        group_present = group_exists(root, name)
        created_group[0] = not group_present
        result = runner(useradd_command(root, name, group_present))
        if not result.ok:
            raise RuntimeFailure(f"useradd failed: {result.reason()}")
        manifest.data["created_user"] = True
        return f"created system user and group {name} (uid {inst.user()[0]})"

    def undo() -> None:
        if lookup_user(root, name) is not None:
            runner(["userdel", *prefix(root), name])
        if created_group[0] and group_exists(root, name):
            runner(["groupdel", *prefix(root), name])
        manifest.data.pop("created_user", None)

    return Step(f"system user {name}", lambda: lookup_user(root, name) is None, apply, undo,
                "system user")


def dirs_step(inst: Host, manifest: Manifest) -> Step:
    config = inst.config
    created: list[Path] = []
    changed: list[tuple[Path, int, int, int]] = []

    def wanted() -> list[tuple[Path, int, int, int]]:
        uid, gid = inst.user()
        return [(config.state_dir, 0o700, uid, gid), (config.records_dir, 0o750, uid, gid),
                (config.run_dir, 0o755, 0, 0), (inst.layout.public_dir, 0o755, 0, 0)]

    def needed() -> bool:
        for path, mode, uid, gid in wanted():
            try:
                st = path.stat()
            except FileNotFoundError:
                return True
            if st.st_mode & 0o7777 != mode or (st.st_uid, st.st_gid) != (uid, gid):
                return True
        return False

    def apply() -> str:
        for path, mode, uid, gid in wanted():
            if path.exists():
                st = path.stat()
                changed.append((path, st.st_mode & 0o7777, st.st_uid, st.st_gid))
            else:
                created.extend(make_dirs(path, 0o755))
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        manifest.add_dirs([d for d in created if d not in {w[0] for w in wanted()}])
        return (f"directories: state {config.state_dir} (0700), records {config.records_dir} "
                f"(0750), run {config.run_dir}, public {inst.layout.public_dir}")

    def undo() -> None:
        for path in reversed(created):
            shutil.rmtree(path, ignore_errors=True)  # made by this run: all in it is ours
        for path, mode, uid, gid in changed:
            with contextlib.suppress(FileNotFoundError):
                os.chown(path, uid, gid)
                os.chmod(path, mode)

    return Step("directories", needed, apply, undo)


def config_step(inst: Host, manifest: Manifest, template: str = CONFIG_TEMPLATE) -> Step:
    """The default config (the OS's own `template`: its paths), written only where none is."""
    change = FileChange(inst.layout.config_file, template.encode(), 0o644)

    def apply() -> str:
        change.apply()
        manifest.add_dirs(change.created_dirs)
        manifest.data["created_config"] = str(inst.layout.config_file_real)
        return f"wrote the default config {inst.layout.config_file_real}"

    def undo() -> None:
        change.undo()
        manifest.data.pop("created_config", None)

    return Step("config file", lambda: not inst.layout.config_file.exists(), apply, undo)


def ca_step(inst: Host) -> Step:
    ca_dir = inst.config.ca_dir
    created = [False]
    hosts = inst.config.targets.all_hosts
    key_file = ca_dir / ca.KEY_AND_CERT

    def apply() -> str:
        created[0] = not ca_dir.exists()
        uid, gid = inst.user()
        ca.ensure_ca(ca_dir, hosts, uid, gid)
        return f"created the CA {ca.public_cert_path(ca_dir)} (name-constrained to {len(hosts)} " \
               "target domains)"

    def undo() -> None:
        if created[0]:
            shutil.rmtree(ca_dir, ignore_errors=True)
        else:
            for name in (ca.KEY_AND_CERT, ca.PUBLIC_CERT):
                remove_file(ca_dir / name)

    if key_file.exists() and (missing := ca.uncovered_hosts(ca.public_cert_path(ca_dir), hosts)):
        inst.notes.append(f"warning: the CA does not cover {', '.join(missing)}: run "
                          "`sudo llmtap ca rotate`")
    return Step("certificate authority", lambda: not key_file.exists(), apply, undo)


def public_step(inst: Host) -> Step:
    changes: list[FileChange] = []

    def needed() -> bool:
        if not ca.public_cert_path(inst.config.ca_dir).exists():
            return True  # the CA step creates it in this run
        return any(change.needed() for change in inst.public_files())

    def apply() -> str:
        changes[:] = inst.public_files()
        for change in changes:
            change.apply()
        return (f"published the CA for every user: {inst.layout.public_cert_real} and the "
                f"bundle {inst.layout.public_bundle_real} (system roots + CA)")

    def undo() -> None:
        for change in reversed(changes):
            change.undo()

    return Step("public CA files", needed, apply, undo)


def os_trust_step(inst: LinuxInstaller, store: DistroTrustStore, manifest: Manifest) -> Step:
    def apply() -> str:
        store.trust(inst.layout.public_cert)
        if not store.is_trusted(inst.layout.public_cert):
            raise RuntimeFailure(f"{store.name} ran but the CA is not in {store.bundle}")
        manifest.data["trust"] = type(store).__name__
        return f"trusted the CA in the OS store ({store.name})"

    def needed() -> bool:
        return not (inst.layout.public_cert.exists()
                    and store.is_trusted(inst.layout.public_cert))

    return Step(f"OS trust ({store.name})", needed, apply, store.untrust, "OS trust")


def nss_step(inst: LinuxInstaller, nss: NssTrustStore) -> Step:
    def apply() -> str:
        nss.trust(inst.layout.public_cert)
        dirs = ", ".join(str(db.directory) for db in nss.databases)
        return f"trusted the CA in {len(nss.databases)} NSS database(s) (Chrome/Firefox): {dirs}"

    def needed() -> bool:
        return not (inst.layout.public_cert.exists() and nss.is_trusted(inst.layout.public_cert))

    return Step("NSS databases (certutil)", needed, apply, nss.untrust, "NSS databases")


def java_step(inst: LinuxInstaller, java: JavaTrustStore) -> Step:
    def apply() -> str:
        java.trust(inst.layout.public_cert)
        return f"trusted the CA in Java's keystore {java.keystore} (JetBrains IDEs, JVM tools)"

    def needed() -> bool:
        return not (inst.layout.public_cert.exists() and java.is_trusted(inst.layout.public_cert))

    return Step("Java keystore (keytool)", needed, apply, java.untrust, "Java keystore")


def env_step(inst: LinuxInstaller, manifest: Manifest) -> Step:
    changes = inst.env_files()

    def apply() -> str:
        for change in changes:
            change.apply()
            manifest.add_dirs(change.created_dirs)
        names = ", ".join(env_values(Path(), Path()))
        return (f"set {names} for every session: {inst.config.install.profile_script} and "
                f"{inst.config.install.environment_file}")

    def undo() -> None:
        for change in reversed(changes):
            change.undo()

    return Step("runtime environment", lambda: any(c.needed() for c in changes), apply, undo)


def service_step(inst: LinuxInstaller, kind: str, manifest: Manifest) -> Step:
    service = inst.service(kind)

    def needed() -> bool:
        current = not isinstance(service, SystemdService) or service.is_installed()
        return not (current and service.is_running())

    log_dirs: list[Path] = []
    new_log = not inst.layout.log_file.exists()

    def apply() -> str:
        if isinstance(service, DetachedService):
            log_dirs[:] = make_dirs(inst.layout.log_file.parent)
            manifest.add_dirs(log_dirs)
        service.install(inst.layout.run_command())
        service.start()
        inst.system.wait_ready(inst.config, service)
        manifest.data["service"] = kind
        if isinstance(service, DetachedService):
            keeper, daemon = service.pids() or (0, 0)
            return (f"systemd is not running here: started `llmtap run` detached (keeper pid "
                    f"{keeper}, daemon pid {daemon}), restarted on failure, log "
                    f"{inst.config.install.log_file}; it does not start at boot: run "
                    "`sudo llmtap install` again after a reboot")
        unit = service.unit_file if isinstance(service, SystemdService) else kind
        return f"installed and started the systemd service {unit}"

    def undo() -> None:
        service.uninstall()
        inst.system.cleanup_rules()
        manifest.data.pop("service", None)
        if new_log and isinstance(service, DetachedService):
            remove_file(inst.layout.log_file)
        remove_dirs(log_dirs)

    return Step(f"service ({kind})", needed, apply, undo, "service")
