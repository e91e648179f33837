"""`llmtap ca rotate` on macOS as steps: every place that trusted the old CA (the System keychain,
the JDKs) trusts the new one, the daemon restarts with it, and a failure puts the old one back."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmtap.errors import RuntimeFailure
from llmtap.install.ca_files import CaFiles
from llmtap.install.engine import Step
from llmtap.install.files import FileChangeSet

if TYPE_CHECKING:
    from llmtap.install.macos import MacInstaller


class MacRotation(CaFiles):
    def __init__(self, installer: MacInstaller, old_cert_file: Path) -> None:
        super().__init__(installer.config, old_cert_file, installer.user())
        self.inst = installer
        self.public_cert = installer.layout.public_cert
        self.trusted = bool(installer.store.found())
        self.jdks = [store for store in installer.jdk_stores() if store.holds()]
        self.service = installer.service()
        self.running = self.service.is_running()
        self.public = FileChangeSet(installer.public_files)
        self.restarted = False

    def steps(self) -> list[Step]:
        steps = [Step("new CA", lambda: True, self.write_new, self.restore_old),
                 Step("public CA files", lambda: True, self.public.apply, self.public.undo)]
        if self.trusted:
            steps.append(Step("OS trust (System keychain)", lambda: True, self.retrust,
                              lambda: self.trust_only(self.old_cert())))
        if self.jdks:
            steps.append(Step("Java keystores", lambda: True, self.retrust_java, self.untrust_java))
        if self.running:
            steps.append(Step("service restart", lambda: True, self.restart_step, lambda: None))
        return steps

    def trust_only(self, cert: Path) -> None:
        self.inst.store.untrust()  # every llmtap CA, by SHA-1
        self.inst.store.trust(cert)

    def retrust(self) -> str:
        self.trust_only(self.public_cert)
        if not self.inst.store.is_trusted(self.public_cert):
            raise RuntimeFailure("security ran but the new CA does not verify as a trusted root")
        return "trusted the new CA in the System keychain and removed the old one"

    def retrust_java(self) -> str:
        for jdk in self.jdks:
            jdk.trust(self.public_cert)  # replaces the alias
        return f"trusted the new CA in {len(self.jdks)} JDK keystore(s)"

    def untrust_java(self) -> None:
        for jdk in self.jdks:
            jdk.trust(self.old_cert())

    def restart(self) -> None:
        if self.running:
            self.service.stop()
            self.service.start()
            self.inst.system.wait_ready(self.inst.config, self.service)

    def restart_step(self) -> str:
        self.restarted = True
        self.restart()
        return "restarted the LaunchDaemon with the new CA"
