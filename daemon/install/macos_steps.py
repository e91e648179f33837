"""The macOS install steps that differ from Linux's, in the order MacInstaller.install_steps lists
them (directories, CA and public files are linux_steps' own, through install.host.Host)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmtap.ca import write_file
from llmtap.errors import RuntimeFailure
from llmtap.install.engine import Step
from llmtap.install.files import FileChange, make_dirs, remove_dirs, remove_file
from llmtap.install.manifest import Manifest
from llmtap.platform.macos import environment
from llmtap.platform.macos.environment import GuiSession
from llmtap.platform.macos.java import JdkTrustStore
from llmtap.platform.macos.trust import KeychainTrustStore

if TYPE_CHECKING:
    from llmtap.install.macos import MacInstaller


def account_step(inst: MacInstaller, manifest: Manifest) -> Step:
    account, directory = inst.account, inst.directory
    created_group = [False]

    def apply() -> str:
        created_group[0] = directory.read_id(account.group) is None
        ident = directory.create(account)
        manifest.data["created_user"] = account.name
        manifest.data["created_group"] = created_group[0]
        return (f"created the hidden service account {account.name} ({account.alias}), uid and "
                f"gid {ident}, no shell, no home")

    def undo() -> None:
        directory.delete(account.user)
        if created_group[0]:
            directory.delete(account.group)
        manifest.data.pop("created_user", None)
        manifest.data.pop("created_group", None)

    return Step(f"service account {account.name}", lambda: directory.lookup(account) is None,
                apply, undo, "system user")


def keychain_step(inst: MacInstaller, store: KeychainTrustStore) -> Step:
    cert = inst.layout.public_cert

    def apply() -> str:
        store.trust(cert)
        if not store.is_trusted(cert):
            raise RuntimeFailure("security add-trusted-cert ran but the CA does not verify as a "
                                 "trusted root")
        return "trusted the CA as a root in the System keychain (security add-trusted-cert)"

    return Step("OS trust (System keychain)", lambda: not (cert.exists() and store.is_trusted(cert)),
                apply, store.untrust, "OS trust")


class ShellBlock:
    """Our block in one shell startup file; undo puts the file back byte for byte."""

    def __init__(self, path: Path, values: dict[str, str]) -> None:
        self.path, self.values = path, values
        self.before: tuple[bytes, int, int, int] | None = None
        self.created_dirs: list[Path] = []
        self.applied = False

    def wanted(self) -> bytes:
        current = self.path.read_text() if self.path.exists() else ""
        return environment.with_block(current, self.values).encode()

    def needed(self) -> bool:
        return not self.path.exists() or self.path.read_bytes() != self.wanted()

    def apply(self) -> None:
        data = self.wanted()
        if self.path.exists():
            st = self.path.stat()
            self.before = (self.path.read_bytes(), st.st_mode & 0o7777, st.st_uid, st.st_gid)
            write_file(self.path, data, *self.before[1:])
        else:
            self.created_dirs = make_dirs(self.path.parent)
            write_file(self.path, data, 0o644, 0, 0)
        self.applied = True

    def undo(self) -> None:
        if not self.applied:
            return
        if self.before is not None:
            write_file(self.path, *self.before)
        else:
            remove_file(self.path)
            remove_dirs(self.created_dirs)


def shell_env_step(inst: MacInstaller, manifest: Manifest) -> Step:
    blocks = [ShellBlock(path, inst.env_values()) for path in inst.paths.shell_files]

    def apply() -> str:
        created = manifest.data.setdefault("created_files", [])
        for block in blocks:
            if block.needed():
                new = not block.path.exists()
                block.apply()
                manifest.add_dirs(block.created_dirs)
                if new:
                    created.append(str(block.path))
        return (f"set {', '.join(inst.env_values())} for shells: a tagged block in "
                f"{' and '.join(environment.SHELL_FILES)}")

    def undo() -> None:
        for block in reversed(blocks):
            block.undo()
            if str(block.path) in manifest.data.get("created_files", []):
                manifest.data["created_files"].remove(str(block.path))
        if manifest.data.get("created_files") == []:
            manifest.data.pop("created_files")

    return Step("runtime environment (shells)", lambda: any(b.needed() for b in blocks), apply,
                undo, "runtime environment")


def gui_env_step(inst: MacInstaller, manifest: Manifest) -> Step:
    values = inst.env_values()
    agent = FileChange(inst.paths.agent_plist, environment.render_agent(values), 0o644)
    session = GuiSession(inst.system.runner)

    def apply() -> str:
        agent.apply()
        manifest.add_dirs(agent.created_dirs)
        uid = session.set(values)
        now = f"; set now for the console user (uid {uid})" if uid is not None else ""
        return (f"set them for GUI apps: the LaunchAgent {environment.AGENT_DIR}/"
                f"{environment.AGENT_LABEL}.plist runs `launchctl setenv` at each login{now}")

    def undo() -> None:
        agent.undo()
        session.unset(list(values), values)

    return Step("runtime environment (GUI apps)", agent.needed, apply, undo, "GUI environment")


def service_step(inst: MacInstaller, manifest: Manifest) -> Step:
    service = inst.service()
    log_file = inst.layout.log_file
    new_log = not log_file.exists()
    log_dirs: list[Path] = []

    def needed() -> bool:
        current = service.plist.exists() and service.plist.read_bytes() == inst.daemon_plist()
        return not (current and service.is_running())

    def apply() -> str:
        if not log_file.exists():
            log_dirs[:] = make_dirs(log_file.parent)
            write_file(log_file, b"", 0o640, 0, 0)
        service.install(inst.layout.run_command())
        service.start()
        inst.system.wait_ready(inst.config, service)
        manifest.data["service"] = "launchd"
        return (f"installed and started the LaunchDaemon {inst.paths.daemon_plist} (KeepAlive, "
                f"log {inst.config.install.log_file}); it loads the pf anchor and enables pf by "
                "reference token")

    def undo() -> None:
        service.uninstall()
        inst.cleanup_pf()
        manifest.data.pop("service", None)
        if new_log:
            remove_file(log_file)
        remove_dirs(log_dirs)

    return Step("service (launchd)", needed, apply, undo, "service")


def java_step(inst: MacInstaller, stores: list[JdkTrustStore]) -> Step:
    done: list[JdkTrustStore] = []

    def needed() -> bool:
        cert = inst.layout.public_cert
        return not cert.exists() or any(not store.is_trusted(cert) for store in stores)

    def apply() -> str:
        for store in stores:
            if not (inst.layout.public_cert.exists() and store.is_trusted(inst.layout.public_cert)):
                store.trust(inst.layout.public_cert)
                done.append(store)
        return (f"trusted the CA in {len(done)} JDK keystore(s) (alias llmtap): "
                f"{', '.join(str(store.home) for store in done)}")

    def undo() -> None:
        for store in reversed(done):
            store.untrust()
        done.clear()

    return Step("Java keystores (keytool)", needed, apply, undo, "Java keystore")
