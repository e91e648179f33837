"""`llmtap ca rotate` on Linux as steps: every place that trusted the old CA trusts the new one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtap.errors import RuntimeFailure
from llmtap.install.ca_files import CaFiles
from llmtap.install.engine import Step
from llmtap.install.files import FileChangeSet

if TYPE_CHECKING:
    from llmtap.install.linux import LinuxInstaller


class Rotation(CaFiles):
    """`llmtap ca rotate` as steps: every place that trusted the old CA trusts the new one."""

    def __init__(self, installer: LinuxInstaller) -> None:
        config, layout = installer.config, installer.layout
        super().__init__(config, config.ca_dir / "previous-ca.pem", installer.user())
        self.installer = installer
        self.published = layout.public_cert.exists()
        self.store = installer.trusted_store(layout.public_cert if self.published
                                             else self.cert_file)
        nss = installer.nss_store()
        self.nss = nss if nss and nss.holders() else None
        java = installer.java_store()
        self.java = java if java and java.holds() else None
        kind = installer.manifest_service()
        self.service = installer.service(kind) if kind else None
        self.running = bool(self.service and self.service.is_running())
        self.unmanaged_daemon = not self.running and installer.daemon_answers()
        self.public = FileChangeSet(installer.public_files)
        self.restarted = False

    def steps(self) -> list[Step]:
        steps = [Step("new CA", lambda: True, self.write_new, self.restore_old)]
        if self.published:
            steps.append(Step("public CA files", lambda: True, self.public.apply, self.public.undo))
        if self.store is not None:
            steps.append(Step(f"OS trust ({self.store.name})", lambda: True, self.retrust_os,
                              self.untrust_new_os))
        if self.nss is not None:
            steps.append(Step("NSS databases", lambda: True, self.retrust_nss,
                              lambda: self.nss.trust(self.old_cert()) if self.nss else None))
        if self.java is not None:
            steps.append(Step("Java keystore", lambda: True, self.retrust_java,
                              lambda: self.java.trust(self.old_cert()) if self.java else None))
        if self.running:
            steps.append(Step("service restart", lambda: True, self.restart_step, lambda: None))
        return steps

    def retrust_os(self) -> str:
        assert self.store is not None
        public = self.installer.layout.public_cert if self.published else self.cert_file
        self.store.untrust()
        self.store.trust(public)
        if not self.store.is_trusted(public):
            raise RuntimeFailure(f"{self.store.name} ran but the new CA is not in {self.store.bundle}")
        return f"trusted the new CA in the OS store ({self.store.name}) and removed the old one"

    def untrust_new_os(self) -> None:
        assert self.store is not None
        self.store.untrust()
        self.store.trust(self.old_cert())

    def retrust_java(self) -> str:
        assert self.java is not None
        self.java.trust(self.installer.layout.public_cert)
        return f"trusted the new CA in Java's keystore {self.java.keystore}"

    def retrust_nss(self) -> str:
        assert self.nss is not None
        self.nss.trust(self.installer.layout.public_cert)
        return f"trusted the new CA in {len(self.nss.databases)} NSS database(s)"

    def restart(self) -> None:
        if self.service is not None and self.running:
            self.service.stop()
            self.service.start()
            self.installer.system.wait_ready(self.installer.config, self.service)

    def restart_step(self) -> str:
        self.restarted = True
        self.restart()
        return "restarted the service with the new CA"

