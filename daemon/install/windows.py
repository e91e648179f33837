"""`llmtap install`, `uninstall` and `ca rotate` on Windows, through Windows' own tools.

The Windows provider: the same steps as on Linux where they mean something here, on the same
engine (llmtap.install.engine) and install record: directories for Administrators and SYSTEM
only (icacls, not a service user), the default config, the CA, its public copy and bundle for
every user, the Root store (certutil), machine-wide variables for the runtimes that do not read
that store (setx), and the service (pywin32, or a scheduled task). There is no `llmtap` user:
the service runs as LocalSystem and `llmtap run` never drops its rights (llmtap.platform.windows.inprocess).
Every command goes through an injectable Runner, so tests assert the exact commands on Linux.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmtap import ca, redirect
from llmtap.ca import write_file
from llmtap.config import DEFAULT_CONFIG_PATH, Config, config_path
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.install import windows_removal as removal
from llmtap.install.engine import DATA_STEPS, Removal, Report, Step, run_recorded, run_removals
from llmtap.install.files import remove_file
from llmtap.install.manifest import MANIFEST, Manifest, remove_created_dirs
from llmtap.install.ready import port_in_use, wait_for_daemon
from llmtap.install.runtime_env import ca_bundle, env_values
from llmtap.platform.base import ServiceManager
from llmtap.platform.runner import Runner, SubprocessRunner
from llmtap.platform.windows import acl
from llmtap.platform.windows.elevation import ElevationCheck, is_elevated, require_elevated
from llmtap.platform.windows.environment import MachineEnvironment
from llmtap.platform.windows.firewall import RULE_NAME, FirewallRule
from llmtap.platform.windows.service import WindowsService, service_manager
from llmtap.platform.windows.trust import CertutilTrustStore

CONFIG_TEMPLATE = """\
# llmtap configuration, written by `llmtap install` (elevated). Every key is optional; the values
# shown are the defaults. After a change restart the service (`sc.exe stop llmtap`, then start).
#
# [redirect]
# backend    = "auto"     # auto | windivert
# scope      = "targets"  # targets | all
# ports      = [443]
# proxy_port = 8443
#
# [targets]
# extra_hosts = []        # more API hosts to tap (then: llmtap ca rotate)
#
# [upstream]
# extra_ca = ""           # PEM bundle trusted upstream in addition to certifi's roots
"""


def llmtap_command() -> str:
    """The llmtap executable the service runs (pip puts llmtap.exe next to python.exe in a
    venv, in Scripts\\ otherwise)."""
    argv0 = Path(sys.argv[0])
    if argv0.stem.lower() == "llmtap" and argv0.suffix.lower() == ".exe" and argv0.is_file():
        return str(argv0.absolute())
    here = Path(sys.executable).parent
    for candidate in (here / "llmtap.exe", here / "Scripts" / "llmtap.exe"):
        if candidate.is_file():
            return str(candidate)
    return shutil.which("llmtap") or str(here / "Scripts" / "llmtap.exe")


def windows_hint(config: Config) -> Callable[[ServiceManager], str]:
    def hint(_service: ServiceManager) -> str:
        return f"see {config.install.log_file} and the Application event log"

    return hint


def wait_for_service(config: Config, service: ServiceManager) -> None:
    wait_for_daemon(config, service, windows_hint(config))


@dataclass
class WindowsSystem:
    """Everything install touches outside its own files; tests replace parts of it."""

    runner: Runner = field(default_factory=SubprocessRunner)
    elevated: ElevationCheck = is_elevated
    choose_backend: Callable[[str], object] = redirect.choose_backend
    check_port: Callable[[int], None] = port_in_use
    cleanup_rules: Callable[[], list[str]] = redirect.cleanup_all
    service: Callable[[ElevationCheck], ServiceManager] = service_manager
    wait_ready: Callable[[Config, ServiceManager], None] = wait_for_service
    command: Callable[[], str] = llmtap_command


class WindowsInstaller:
    def __init__(self, config: Config, explicit_config: str | None = None,
                 system: WindowsSystem | None = None, report: Report = print) -> None:
        self.config = config
        path, named = config_path(explicit_config)
        self.explicit_config = path.absolute() if named else None
        self.system = system or WindowsSystem()
        self.report = report
        runner, elevated = self.system.runner, self.system.elevated
        self.store = CertutilTrustStore(runner, elevated=elevated)
        self.environment = MachineEnvironment(runner)
        self.firewall = FirewallRule(runner)

    # --- paths ---

    @property
    def config_file(self) -> Path:
        return self.explicit_config or DEFAULT_CONFIG_PATH

    @property
    def public_cert(self) -> Path:
        return self.config.install.public_dir / ca.PUBLIC_CERT

    @property
    def public_bundle(self) -> Path:
        return self.config.install.public_dir / "ca-bundle.pem"

    @property
    def manifest_path(self) -> Path:
        return self.config.state_dir / MANIFEST

    def private_dirs(self) -> list[Path]:
        """For Administrators and SYSTEM only: the default config's directory too, since every
        user may create files in a new folder of %ProgramData% (a planted config.toml)."""
        dirs = [self.config.state_dir, self.config.records_dir, self.config.run_dir]
        if self.explicit_config is None:
            dirs.insert(0, self.config_file.parent)
        return list(dict.fromkeys(dirs))

    def run_command(self) -> list[str]:
        return [self.system.command(), "run", "--config", str(self.config_file)]

    def env(self) -> dict[str, str]:
        return env_values(self.public_cert, self.public_bundle)

    def service(self) -> ServiceManager:
        return self.system.service(self.system.elevated)

    # --- install ---

    def preflight(self, service: bool) -> None:
        require_elevated("llmtap install", self.system.elevated)
        for key, path in (("state_dir", self.config.state_dir),
                          ("records_dir", self.config.records_dir),
                          ("run_dir", self.config.run_dir),
                          ("install.public_dir", self.config.install.public_dir)):
            if not path.is_absolute():
                raise UsageError(f"{key} must be an absolute path, not {str(path)!r}")
        self.system.choose_backend(self.config.redirect.backend)
        if service:
            command = Path(self.system.command())
            if not command.is_file():
                raise UsageError(f"the llmtap command {command} does not exist: set install.command")
            if not self.service().is_running():
                self.system.check_port(self.config.redirect.proxy_port)

    def install(self, trust: bool = True, service: bool = True) -> list[str]:
        self.preflight(service)
        self.report("not on Windows: no `llmtap` user (the service runs as LocalSystem; "
                    "directories are for Administrators and SYSTEM only)")
        manifest = Manifest(self.manifest_path)
        done = run_recorded(self.install_steps(trust, service, manifest), manifest, self.report)
        if not done:
            self.report("nothing to change: llmtap is already installed"
                        + (" and running" if service else ""))
        else:
            start = "" if service else "; start the daemon with `llmtap run` (elevated)"
            self.report("next: open a new terminal (the variables are set for new sessions), "
                        f"then `llmtap env --shell powershell`; `llmtap doctor` checks it all{start}")
        return [s.name for s in done]

    def install_steps(self, trust: bool, service: bool, manifest: Manifest) -> list[Step]:
        steps = [self.dirs_step(manifest)]
        if self.explicit_config is None:
            steps.append(self.config_step(manifest))
        steps += [self.ca_step(), self.public_step()]
        if trust:
            steps.append(self.trust_step(manifest))
        steps += [self.env_step(manifest), self.firewall_step()]
        if service:
            steps.append(self.service_step(manifest))
        steps.append(manifest.step())
        return steps

    def dirs_step(self, manifest: Manifest) -> Step:
        public = self.config.install.public_dir
        created: list[Path] = []
        runner = self.system.runner

        def apply() -> str:
            for directory in [*self.private_dirs(), public]:
                missing = [p for p in (directory, *directory.parents) if not p.exists()][::-1]
                for path in missing:
                    path.mkdir()
                    created.append(path)
            for directory in self.private_dirs():
                acl.take_ownership(directory, runner)
                acl.restrict_to_administrators(directory, runner)
            acl.open_for_reading(public, runner)  # inside the restricted one by default
            manifest.add_dirs(created)
            return (f"directories for Administrators and SYSTEM only: "
                    f"{', '.join(map(str, self.private_dirs()))}; readable by users: {public}")

        def undo() -> None:
            for path in reversed(created):
                shutil.rmtree(path, ignore_errors=True)  # made by this run: all in it is ours

        needed = lambda: not all(d.is_dir() for d in [*self.private_dirs(), public])  # noqa: E731
        return Step("directories", needed, apply, undo)

    def config_step(self, manifest: Manifest) -> Step:
        path = self.config_file

        def apply() -> str:
            write_file(path, CONFIG_TEMPLATE.encode(), 0o644)
            manifest.data["created_config"] = str(path)
            return f"wrote the default config {path}"

        def undo() -> None:
            remove_file(path)
            manifest.data.pop("created_config", None)

        return Step("config file", lambda: not path.exists(), apply, undo)

    def ca_step(self) -> Step:
        ca_dir, hosts = self.config.ca_dir, self.config.targets.all_hosts
        key_file = ca_dir / ca.KEY_AND_CERT
        created = [False]

        def apply() -> str:
            created[0] = not ca_dir.exists()
            ca.ensure_ca(ca_dir, hosts, -1, -1)  # no owner to give it: the ACL decides
            return (f"created the CA {ca.public_cert_path(ca_dir)} (name-constrained to "
                    f"{len(hosts)} target domains)")

        def undo() -> None:
            if created[0]:
                shutil.rmtree(ca_dir, ignore_errors=True)

        return Step("certificate authority", lambda: not key_file.exists(), apply, undo)

    def public_files(self) -> dict[Path, bytes]:
        cert = ca.public_cert_path(self.config.ca_dir).read_bytes()
        return {self.public_cert: cert,
                self.public_bundle: ca_bundle(ca.system_roots("win32"), cert)}

    def public_step(self) -> Step:
        def needed() -> bool:
            if not ca.public_cert_path(self.config.ca_dir).exists():
                return True
            return any(not p.is_file() or p.read_bytes() != data
                       for p, data in self.public_files().items())

        def apply() -> str:
            for path, data in self.public_files().items():
                write_file(path, data, 0o644)
            return (f"published the CA for every user: {self.public_cert} and the bundle "
                    f"{self.public_bundle} (certifi's roots + CA)")

        def undo() -> None:
            for path in (self.public_cert, self.public_bundle):
                remove_file(path)

        return Step("public CA files", needed, apply, undo)

    def trust_step(self, manifest: Manifest) -> Step:
        store = self.store

        def apply() -> str:
            store.trust(self.public_cert)
            if not store.is_trusted(self.public_cert):
                raise RuntimeFailure("certutil ran but the CA is not in the Root store")
            manifest.data["trust"] = "certutil"
            return "trusted the CA in the machine's Root store (certutil)"

        def needed() -> bool:
            return not (self.public_cert.exists() and store.is_trusted(self.public_cert))

        return Step("OS trust (certutil)", needed, apply, store.untrust, "OS trust")

    def env_step(self, manifest: Manifest) -> Step:
        before: dict[str, str | None] = {}

        def changed() -> dict[str, str]:
            return {k: v for k, v in self.env().items() if self.environment.get(k) != v}

        def apply() -> str:
            for name, value in changed().items():
                before[name] = self.environment.get(name)
                self.environment.set(name, value)
            manifest.data["environment"] = sorted(self.env())
            return f"set {', '.join(self.env())} machine-wide (new sessions)"

        def undo() -> None:
            for name, value in before.items():
                if value is None:
                    self.environment.delete(name)
                else:
                    self.environment.set(name, value)

        return Step("runtime environment", lambda: bool(changed()), apply, undo)

    def firewall_step(self) -> Step:
        port, rule = self.config.redirect.proxy_port, self.firewall

        def apply() -> str:
            rule.add(port)
            return f"blocked inbound TCP {port} from other hosts (firewall rule {RULE_NAME})"

        return Step("firewall rule (netsh)", lambda: not rule.in_place(port), apply, rule.remove,
                    "firewall rule")

    def service_step(self, manifest: Manifest) -> Step:
        service = self.service()
        kind = service.name

        def apply() -> str:
            service.install(self.run_command())
            service.start()
            self.system.wait_ready(self.config, service)
            manifest.data["service"] = kind
            what = ("the Windows service llmtap" if kind == WindowsService.name
                    else "the scheduled task llmtap (pywin32 is not installed)")
            return f"installed and started {what}, restarted on failure; log {self.config.install.log_file}"

        def undo() -> None:
            service.uninstall()
            self.system.cleanup_rules()
            manifest.data.pop("service", None)

        return Step(f"service ({kind})", lambda: not service.is_running(), apply, undo, "service")

    # --- uninstall ---

    def uninstall(self, purge: bool = False) -> list[str]:
        """Reverses every step, also on a half-installed machine; keeps going past failures."""
        require_elevated("llmtap uninstall", self.system.elevated)
        manifest = Manifest(self.manifest_path)
        kept = None if purge else (self.config.state_dir, self.config.records_dir)
        return run_removals(self.removals(manifest, purge), self.report, kept,
                            "llmtap uninstall --purge")

    def removals(self, manifest: Manifest, purge: bool) -> list[Removal]:
        found = [
            Removal("service", lambda: removal.services(self, manifest)),
            Removal("rules", lambda: removal.rules(self)),
            Removal("runtime environment", lambda: removal.environment(self)),
            Removal("firewall rule", lambda: removal.firewall(self)),
            Removal("OS trust", lambda: removal.os_trust(self)),
            Removal("public CA files", lambda: removal.public_files(self)),
            Removal("run directory", lambda: removal.run_dir(self)),
        ]
        if purge:
            found += [Removal("data", lambda: removal.data(self), DATA_STEPS),
                      Removal("config file", lambda: removal.config_file(self, manifest))]
        found.append(Removal("directories", lambda: remove_created_dirs(manifest, purge)))
        return found

    def rotate(self) -> None:
        raise UsageError("`llmtap ca rotate` is not available on Windows yet: run `llmtap "
                         "uninstall`, delete the ca folder in state_dir, then `llmtap install`")

