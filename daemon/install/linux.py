"""The Linux provider: a system user, directories, the CA trusted in the distribution's store (and
NSS, Java), the runtime environment and a systemd (or detached) service.

Everything is checked before the first change (root, config, distribution, tools), so a refusal
leaves the machine as it was. Every external command goes through the System's Runner and every
system path through `install.root`, so tests assert exact commands and files in a temporary tree.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from llmtap import ca
from llmtap.config import Config
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.install import linux_removal as removal
from llmtap.install import linux_steps as steps
from llmtap.install.engine import DATA_STEPS, Removal, Report, Step, run_recorded, run_removals, run_steps
from llmtap.install.files import FileChange
from llmtap.install.linux_rotate import Rotation
from llmtap.install.linux_system import Layout, System, make_layout, validate_for_install
from llmtap.install.manifest import Manifest, remove_created_dirs
from llmtap.install.ready import daemon_answers
from llmtap.install.runtime_env import ca_bundle, env_values, environment_d, profile_script
from llmtap.install.secure_path import check_service_command
from llmtap.platform.base import ServiceManager
from llmtap.platform.linux.app_trust import JavaTrustStore, NssTrustStore, find_nss_databases, local_homes
from llmtap.platform.linux.keeper import DetachedService
from llmtap.platform.linux.systemd import SystemdService, UnitSpec, interpreter_of
from llmtap.platform.linux.trust import DistroTrustStore, detect_trust_store
from llmtap.platform.linux.users import lookup_user


class LinuxInstaller:
    def __init__(self, config: Config, explicit_config: str | None = None,
                 system: System | None = None, report: Report = print) -> None:
        self.config = config
        self.layout: Layout = make_layout(config, explicit_config)
        self.system = system or System()
        self.report = report
        self.notes: list[str] = []

    # --- what the steps share ---

    def require_root(self, action: str) -> None:
        if not self.system.is_root():
            raise UsageError(f"{action} needs root: run it with sudo")

    def user(self) -> tuple[int, int]:
        found = lookup_user(self.layout.root, self.config.service_user)
        if found is None:
            raise RuntimeFailure(f"user {self.config.service_user!r} does not exist")
        return found

    def trust_store(self, choice: str | None = None) -> DistroTrustStore:
        return detect_trust_store(choice or self.config.install.trust, self.system.runner,
                                  self.layout.root, self.system.which)

    def nss_store(self) -> NssTrustStore | None:
        if not self.config.install.nss or self.system.which("certutil") is None:
            return None
        databases = find_nss_databases(local_homes(self.layout.root))
        return NssTrustStore(databases, self.system.runner) if databases else None

    def java_store(self) -> JavaTrustStore | None:
        java = JavaTrustStore(self.system.runner, self.layout.root, self.system.which)
        return java if java.present() else None

    def service_kind(self) -> str:
        kind = self.config.install.service
        if kind == "auto":
            return "systemd" if self.system.systemd() else "detached"
        if kind == "systemd" and not self.system.systemd():
            raise UsageError("install.service = \"systemd\" but systemd is not running here: "
                             "use \"auto\" or \"detached\"")
        return kind

    def service(self, kind: str) -> ServiceManager:
        layout = self.layout
        if kind == "systemd":
            command = Path(layout.command())
            reads = [command, layout.config_file_real]
            if interpreter := interpreter_of(command):
                reads.append(interpreter)
            spec = UnitSpec(
                exec_start=layout.run_command(), exec_stop_post=layout.cleanup_command(),
                read_write_paths=(self.config.state_dir, self.config.records_dir,
                                  self.config.run_dir),
                run_dir=self.config.run_dir, reads=tuple(reads))
            return SystemdService(spec, self.system.runner, layout.unit_dir)
        service = DetachedService(layout.keeper_pidfile, layout.log_file,
                                  layout.cleanup_command(), spawn=self.system.spawn)
        service.install(layout.run_command())
        return service

    def daemon_answers(self) -> bool:
        return daemon_answers(self.config)

    def public_files(self) -> list[FileChange]:
        """The CA and the bundle (system roots + CA), readable by every user and runtime."""
        cert_pem = ca.public_cert_path(self.config.ca_dir).read_bytes()
        return [FileChange(self.layout.public_cert, cert_pem, 0o644),
                FileChange(self.layout.public_bundle, ca_bundle(self.system_roots(), cert_pem), 0o644)]

    def system_roots(self) -> bytes:
        for candidate in ca.SYSTEM_ROOT_BUNDLES:
            path = self.layout.at(candidate)
            if path.is_file():
                return path.read_bytes()
        return ca.system_roots() if self.layout.root == Path("/") else b""

    def env_files(self) -> list[FileChange]:
        values = env_values(self.layout.public_cert_real, self.layout.public_bundle_real)
        return [FileChange(self.layout.profile_script, profile_script(values).encode(), 0o644),
                FileChange(self.layout.environment_file, environment_d(values).encode(), 0o644)]

    # --- install ---

    def preflight(self, trust: bool, service: bool) -> tuple[DistroTrustStore | None, str | None]:
        """Every refusal happens here, before the first change."""
        self.require_root("llmtap install")
        validate_for_install(self.config)
        self.system.choose_backend(self.config.redirect.backend)
        store = self.trust_store() if trust else None
        kind = self.service_kind() if service else None
        if kind is not None:
            check_service_command(Path(self.layout.command()))
            if not self.daemon_answers() and not self.service(kind).is_running():
                self.system.check_port(self.config.redirect.proxy_port)
        return store, kind

    def install(self, trust: bool = True, service: bool = True) -> list[str]:
        store, kind = self.preflight(trust, service)
        manifest = Manifest(self.layout.manifest)
        done = run_recorded(self.install_steps(store, kind, manifest), manifest, self.report)
        if not done:
            self.report("nothing to change: llmtap is already installed"
                        + (" and running" if kind else ""))
        for note in self.notes:
            self.report(note)
        if done:
            self.report(self.next_steps(kind))
        return [s.name for s in done]

    def install_steps(self, store: DistroTrustStore | None, kind: str | None,
                      manifest: Manifest) -> list[Step]:
        planned = [steps.user_step(self, manifest), steps.dirs_step(self, manifest)]
        if self.layout.explicit_config is None:
            planned.append(steps.config_step(self, manifest))
        planned += [steps.ca_step(self), steps.public_step(self)]
        if store is not None:
            planned.append(steps.os_trust_step(self, store, manifest))
            if nss := self.nss_store():
                planned.append(steps.nss_step(self, nss))
            if java := self.java_store():
                planned.append(steps.java_step(self, java))
        planned.append(steps.env_step(self, manifest))
        if kind is not None:
            planned.append(steps.service_step(self, kind, manifest))
        planned.append(manifest.step())
        return planned

    def next_steps(self, kind: str | None) -> str:
        shell = f"open a new shell (or `. {self.config.install.profile_script}`)"
        start = "" if kind else "; start the daemon with `sudo llmtap run`"
        return (f"next: {shell}, then `llmtap env` for the placeholder keys of your AI tools and "
                f"`llmtap dashboard` to watch their calls; `llmtap doctor` checks it all{start}")

    # --- uninstall ---

    def uninstall(self, purge: bool = False) -> list[str]:
        """Reverses every step, also on a half-installed machine; keeps going past failures."""
        self.require_root("llmtap uninstall")
        validate_for_install(self.config)
        manifest = Manifest(self.layout.manifest)
        kept = None if purge else (self.config.state_dir, self.config.records_dir)
        return run_removals(self.removals(manifest, purge), self.report, kept,
                            "sudo llmtap uninstall --purge")

    def removals(self, manifest: Manifest, purge: bool) -> list[Removal]:
        found = [
            Removal("service", lambda: removal.services(self)),
            Removal("rules", lambda: removal.rules(self)),
            Removal("runtime environment", lambda: removal.environment(self)),
            Removal("NSS databases", lambda: removal.nss(self)),
            Removal("Java keystore", lambda: removal.java(self)),
            Removal("OS trust", lambda: removal.os_trust(self, manifest)),
            Removal("public CA files", lambda: removal.public_files(self)),
            Removal("run directory", lambda: removal.run_dir(self)),
        ]
        if purge:
            found += [Removal("data", lambda: removal.data(self), DATA_STEPS),
                      Removal("config file", lambda: removal.config_file(self, manifest)),
                      Removal("system user", lambda: removal.user(self, manifest))]
        found.append(Removal("directories", lambda: remove_created_dirs(manifest, purge)))
        return found

    # --- ca rotate ---

    def rotate(self) -> None:
        """A new CA for the current targets: trusted where the old one was, the old one removed."""
        self.require_root("llmtap ca rotate")
        validate_for_install(self.config)
        if not (self.config.ca_dir / ca.KEY_AND_CERT).exists():
            raise UsageError("there is no CA yet: run `sudo llmtap install`")
        rotation = Rotation(self)
        try:
            run_steps(rotation.steps(), self.report)
        except RuntimeFailure:
            if rotation.restarted:  # the daemon may have loaded the new CA: back to the old one
                with contextlib.suppress(Exception):
                    rotation.restart()
            raise
        finally:
            rotation.old_cert_file.unlink(missing_ok=True)
        if rotation.unmanaged_daemon:
            self.report("restart your `llmtap run` so it uses the new CA")
        self.report("the old CA is gone: its key is deleted and it is trusted nowhere")

    def trusted_store(self, cert: Path) -> DistroTrustStore | None:
        try:
            store = self.trust_store()
        except UsageError:
            return None
        return store if store.is_trusted(cert) else None

    def manifest_service(self) -> str | None:
        kind = Manifest(self.layout.manifest).data.get("service")
        return kind if kind in ("systemd", "detached") else None
