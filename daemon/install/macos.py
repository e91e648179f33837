"""The macOS provider: a hidden service account (dscl), the state, records and run directories,
the default config, the CA (name-constrained) and its public copy and bundle, the CA trusted in
the System keychain, the environment for runtimes that ignore the keychain (shells and GUI apps,
see platform.macos.environment), the LaunchDaemon (which loads the pf anchor and enables pf by
reference token, platform.macos.pf) and the install record, on the same engine as Linux.

Everything is checked before the first change (root, macOS version, config, the pf hooks of the
main ruleset, the llmtap command), so a refusal leaves the machine as it was. Every command goes
through the System's Runner and every system path through `install.root`: tests run the whole
lifecycle against a fake macOS on Linux.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from llmtap import ca
from llmtap.config import Config
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.install import linux_steps, macos_removal, macos_steps
from llmtap.install.engine import (
    DATA_STEPS,
    Removal,
    Report,
    Step,
    run_recorded,
    run_removals,
    run_steps,
)
from llmtap.install.files import FileChange
from llmtap.install.linux_system import Layout, make_layout, validate_for_install
from llmtap.install.macos_rotate import MacRotation
from llmtap.install.macos_system import (
    CONFIG_TEMPLATE,
    MIN_MACOS,
    SW_VERS,
    MacPaths,
    MacSystem,
    parse_sw_vers,
    pf_hooks_missing,
)
from llmtap.install.manifest import Manifest, remove_created_dirs
from llmtap.install.ready import daemon_answers
from llmtap.install.runtime_env import ca_bundle, env_values
from llmtap.install.secure_path import check_service_command
from llmtap.platform.macos import launchd, pf
from llmtap.platform.macos.java import JdkTrustStore, jdk_homes
from llmtap.platform.macos.launchd import LaunchdService
from llmtap.platform.macos.trust import KeychainTrustStore
from llmtap.platform.macos.users import Account, Directory, account_for


class MacInstaller:
    def __init__(self, config: Config, explicit_config: str | None = None,
                 system: MacSystem | None = None, report: Report = print) -> None:
        self.config = config
        self.layout: Layout = make_layout(config, explicit_config)
        self.paths = MacPaths(self.layout)
        self.system = system or MacSystem()
        self.report = report
        self.notes: list[str] = []
        self.account: Account = account_for(config.service_user)
        self.directory = Directory(self.system.runner)
        self.store = KeychainTrustStore(self.system.runner)
        self._ids: tuple[int, int] | None = None

    # --- what the steps share ---

    def user(self) -> tuple[int, int]:
        """(uid, gid) of the service account; asked of dscl until it exists, then remembered."""
        if self._ids is None:
            self._ids = self.directory.lookup(self.account)
        if self._ids is None:
            raise RuntimeFailure(f"user {self.account.name!r} does not exist")
        return self._ids

    def public_files(self) -> list[FileChange]:
        """The CA and the bundle (Apple's roots + CA): Python's SSL_CERT_FILE replaces its store."""
        cert_pem = ca.public_cert_path(self.config.ca_dir).read_bytes()
        if self.paths.roots.is_file():
            roots = self.paths.roots.read_bytes()
        else:  # no /etc/ssl/cert.pem: certifi's roots, or the bundle would trust the CA alone
            roots = ca.system_roots() if self.layout.root == Path("/") else b""
        return [FileChange(self.layout.public_cert, cert_pem, 0o644),
                FileChange(self.layout.public_bundle, ca_bundle(roots, cert_pem), 0o644)]

    def env_values(self) -> dict[str, str]:
        return env_values(self.layout.public_cert_real, self.layout.public_bundle_real)

    def jdk_stores(self) -> list[JdkTrustStore]:
        return [JdkTrustStore(home, self.system.runner, self.layout.root)
                for home in jdk_homes(self.layout.root)]

    def service(self) -> LaunchdService:
        return LaunchdService(self.system.runner, plist_dir=self.paths.daemon_plist_dir,
                              log_file=str(self.config.install.log_file))

    def daemon_plist(self) -> bytes:
        return launchd.render_plist(self.layout.run_command(), log_file=str(self.config.install.log_file))

    def cleanup_pf(self) -> list[str]:
        """The anchor's rules and our pf reference, after the daemon is gone (crashed or not)."""
        removed = []
        if any(pf.parse_rules(self.system.runner(pf.show_command(what)).stdout)
               for what in ("nat", "rules")):
            self.system.runner(pf.flush_command())
            removed.append(f"pf anchor {pf.ANCHOR}")
        token_file = self.paths.token_file
        with contextlib.suppress(FileNotFoundError):
            token = token_file.read_text().strip()
            if token.isdigit():
                self.system.runner(pf.release_command(token))  # pf stays on if others enabled it
            token_file.unlink()
            removed.append("pf reference token")
        return removed

    # --- install ---

    def preflight(self, action: str, service: bool = False) -> None:
        """Every refusal happens here, before the first change."""
        if not self.system.is_root():
            raise UsageError(f"llmtap {action} needs root: run it with sudo")
        validate_for_install(self.config)
        result = self.system.runner([SW_VERS])
        name, version = parse_sw_vers(result.stdout) if result.ok else ("", ())
        if not version:
            raise UsageError(f"this is not macOS (sw_vers: {result.reason()})")
        if version < MIN_MACOS:
            raise UsageError(f"{name} is too old: llmtap needs macOS "
                             f"{'.'.join(map(str, MIN_MACOS))} or later")
        if self.config.redirect.backend not in ("auto", "pf"):
            raise UsageError(f"redirect.backend {self.config.redirect.backend!r} does not exist on "
                             "macOS: use \"auto\" or \"pf\"")
        if service:
            self.preflight_service()

    def preflight_service(self) -> None:
        if missing := pf_hooks_missing(self.system.runner):
            raise UsageError(f"the main pf ruleset does not call {' and '.join(missing)} (custom "
                             "/etc/pf.conf?): add them back, then `sudo pfctl -f /etc/pf.conf`")
        check_service_command(Path(self.layout.command()))
        if not daemon_answers(self.config) and not self.service().is_running():
            self.system.check_port(self.config.redirect.proxy_port)

    def install(self, trust: bool = True, service: bool = True) -> list[str]:
        self.preflight("install", service)
        manifest = Manifest(self.layout.manifest)
        done = run_recorded(self.install_steps(manifest, trust, service), manifest, self.report)
        if not done:
            self.report("nothing to change: llmtap is already installed"
                        + (" and running" if service else ""))
        for note in self.notes:
            self.report(note)
        if done:
            start = "" if service else "; start the daemon with `sudo llmtap run`"
            self.report("next: open a new terminal (apps started from now on get the variables "
                        "too), then `llmtap env` for the placeholder keys of your AI tools; "
                        f"`llmtap doctor` checks it all{start}")
        return [s.name for s in done]

    def install_steps(self, manifest: Manifest, trust: bool = True, service: bool = True
                      ) -> list[Step]:
        planned = [macos_steps.account_step(self, manifest), linux_steps.dirs_step(self, manifest)]
        if self.layout.explicit_config is None:
            planned.append(linux_steps.config_step(self, manifest, CONFIG_TEMPLATE))
        planned += [linux_steps.ca_step(self), linux_steps.public_step(self)]
        if trust:
            planned.append(macos_steps.keychain_step(self, self.store))
            if jdks := self.jdk_stores():
                planned.append(macos_steps.java_step(self, jdks))
        planned += [macos_steps.shell_env_step(self, manifest),
                    macos_steps.gui_env_step(self, manifest)]
        if service:
            planned.append(macos_steps.service_step(self, manifest))
        planned.append(manifest.step())
        return planned

    # --- uninstall ---

    def uninstall(self, purge: bool = False) -> list[str]:
        """Reverses every step, also on a half-installed machine; keeps going past failures."""
        self.preflight("uninstall")
        manifest = Manifest(self.layout.manifest)
        kept = None if purge else (self.config.state_dir, self.config.records_dir)
        return run_removals(self.removals(manifest, purge), self.report, kept,
                            "sudo llmtap uninstall --purge")

    def removals(self, manifest: Manifest, purge: bool) -> list[Removal]:
        found = [
            Removal("service", lambda: macos_removal.service(self)),
            Removal("rules", lambda: macos_removal.rules(self)),
            Removal("GUI environment", lambda: macos_removal.gui_environment(self)),
            Removal("runtime environment", lambda: macos_removal.shell_environment(self, manifest)),
            Removal("Java keystore", lambda: macos_removal.java(self)),
            Removal("OS trust", lambda: macos_removal.keychain(self)),
            Removal("public CA files", lambda: macos_removal.public_files(self)),
            Removal("run directory", lambda: macos_removal.run_dir(self)),
        ]
        if purge:
            found += [Removal("data", lambda: macos_removal.data(self), DATA_STEPS),
                      Removal("config file", lambda: macos_removal.config_file(self, manifest)),
                      Removal("system user", lambda: macos_removal.account(self, manifest))]
        found.append(Removal("directories", lambda: remove_created_dirs(manifest, purge)))
        return found

    def rotate(self) -> None:
        """A new CA for the current targets: trusted where the old one was, the old one removed."""
        self.preflight("ca rotate")
        if not (self.config.ca_dir / ca.KEY_AND_CERT).exists():
            raise UsageError("there is no CA yet: run `sudo llmtap install`")
        rotation = MacRotation(self, self.config.ca_dir / "previous-ca.pem")
        try:
            run_steps(rotation.steps(), self.report)
        except RuntimeFailure:
            if rotation.restarted:  # the daemon may have loaded the new CA: back to the old one
                with contextlib.suppress(Exception):
                    rotation.restart()
            raise
        finally:
            rotation.old_cert_file.unlink(missing_ok=True)
        self.report("the old CA is gone: its key is deleted and it is trusted nowhere")
