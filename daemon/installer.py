"""`llmtap install`, `uninstall` and `ca rotate`: the machine-wide lifecycle.

Install is a list of steps. Each step knows whether it is needed (so a second run changes
nothing and says so), does its change, and registers how to undo it: when a step fails, the steps
already done are undone in reverse order and the message names the failed step. Everything is
checked before the first change (root, config, distribution, tools), so a refusal leaves the
machine as it was. Every external command goes through an injectable Runner and every system
path through `install.root`, so tests assert exact commands and files in a temporary tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from llmtap import ca, control, redirect
from llmtap.ca import write_file
from llmtap.config import DEFAULT_CONFIG_PATH, Config, config_path
from llmtap.errors import LlmtapError, RuntimeFailure, UsageError
from llmtap.platform.base import ServiceManager
from llmtap.platform.linux.keeper import DetachedService, Spawn, spawn_detached
from llmtap.platform.linux.systemd import SystemdService, UnitSpec, interpreter_of, systemd_running
from llmtap.platform.linux.trust import (
    PEM_BLOCK,
    DistroTrustStore,
    JavaTrustStore,
    NssTrustStore,
    Which,
    detect_trust_store,
    find_nss_databases,
    local_homes,
    under,
)
from llmtap.platform.runner import Runner, SubprocessRunner

with contextlib.suppress(ImportError):  # Windows has neither: llmtap.installer_windows
    import grp
    import pwd

Report = Callable[[str], None]
MANIFEST = "install.json"
SERVICE_KINDS = ("auto", "systemd", "detached")
TRUST_CHOICES = ("auto", "debian", "fedora", "arch")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
READY_TIMEOUT_S = 60.0
LLMTAP_CA_CN = b"llmtap local CA"

# Runtimes that do not read the OS store, and the file each one is given (see env_lines).
ENV_FOR_CERT = ("NODE_EXTRA_CA_CERTS",)  # Node, Claude Code: added to Node's own roots
ENV_FOR_BUNDLE = (
    "SSL_CERT_FILE",  # OpenSSL tools, Python httpx and the anthropic/openai SDKs, Go, Rust
    "REQUESTS_CA_BUNDLE",  # Python requests (and pip)
    "CURL_CA_BUNDLE",  # curl builds that do not use the OS store
    "CODEX_CA_CERTIFICATE",  # the Codex CLI (it takes precedence over SSL_CERT_FILE)
)

CONFIG_TEMPLATE = """\
# llmtap configuration, written by `sudo llmtap install`. Every key is optional; the values
# shown are the defaults. After a change run `sudo llmtap install` again (it restarts nothing
# that does not need it) or restart the service.
#
# state_dir   = "/var/lib/llmtap"
# records_dir = "/var/lib/llmtap/records"
#
# [redirect]
# backend    = "auto"     # auto | nft | iptables
# scope      = "targets"  # targets | all
# ports      = [443]
# proxy_port = 8443
# block_quic = true
#
# [targets]
# extra_hosts = []        # more API hosts to tap (then: sudo llmtap ca rotate)
#
# [upstream]
# extra_ca = ""           # PEM bundle trusted upstream in addition to the system roots
"""


# --- the system, injectable ----------------------------------------------------------------------


def wait_for_daemon(config: Config, service: ServiceManager, timeout_s: float = READY_TIMEOUT_S,
                    hint: Callable[[ServiceManager], str] | None = None) -> None:
    """Until the daemon answers with its rules in place; fails early when the service died."""
    why = hint or service_hint
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    while time.monotonic() < deadline:
        with contextlib.suppress(LlmtapError):
            status = control.request(config.control_socket, {"cmd": "status"}, timeout_s=2)
            if status and status.get("running") and status.get("rules_present"):
                return
        if time.monotonic() - started > 3 and not service.is_running():
            raise RuntimeFailure(f"the service stopped: {why(service)}")
        time.sleep(0.2)
    raise RuntimeFailure(f"the daemon did not become ready in {timeout_s:g}s: {why(service)}")


def service_hint(service: ServiceManager) -> str:
    if isinstance(service, DetachedService):
        return f"{service.last_log_line()} (log: {service.log_file})"
    return "see `journalctl -u llmtap`"


def port_in_use(port: int) -> None:
    from llmtap.supervisor import listen_hosts  # imports mitmproxy: only when a service starts

    listen_hosts(port)


@dataclass
class System:
    """Everything install touches outside its own files; tests replace parts of it."""

    runner: Runner = field(default_factory=SubprocessRunner)
    which: Which = shutil.which
    spawn: Spawn = spawn_detached
    is_root: Callable[[], bool] = lambda: os.geteuid() == 0
    systemd: Callable[[], bool] = systemd_running
    choose_backend: Callable[[str], object] = redirect.choose_backend
    check_port: Callable[[int], None] = port_in_use
    cleanup_rules: Callable[[], list[str]] = redirect.cleanup_all
    wait_ready: Callable[[Config, ServiceManager], None] = wait_for_daemon


# --- paths ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Every path install touches, as the system sees it (`real`) and where it is written."""

    config: Config
    explicit_config: Path | None  # --config / LLMTAP_CONFIG, used as it is

    @property
    def root(self) -> Path:
        return self.config.install.root

    def at(self, path: Path | str) -> Path:
        return under(self.root, path)

    @property
    def public_cert_real(self) -> Path:
        return self.config.install.public_dir / ca.PUBLIC_CERT

    @property
    def public_bundle_real(self) -> Path:
        return self.config.install.public_dir / "ca-bundle.pem"

    @property
    def public_dir(self) -> Path:
        return self.at(self.config.install.public_dir)

    @property
    def public_cert(self) -> Path:
        return self.at(self.public_cert_real)

    @property
    def public_bundle(self) -> Path:
        return self.at(self.public_bundle_real)

    @property
    def profile_script(self) -> Path:
        return self.at(self.config.install.profile_script)

    @property
    def environment_file(self) -> Path:
        return self.at(self.config.install.environment_file)

    @property
    def log_file(self) -> Path:
        return self.at(self.config.install.log_file)

    @property
    def unit_dir(self) -> Path:
        return self.at(self.config.install.unit_dir)

    @property
    def config_file_real(self) -> Path:
        """The config the service is started with."""
        return self.explicit_config or DEFAULT_CONFIG_PATH

    @property
    def config_file(self) -> Path:
        return self.explicit_config or self.at(DEFAULT_CONFIG_PATH)

    @property
    def manifest(self) -> Path:
        return self.config.state_dir / MANIFEST

    @property
    def keeper_pidfile(self) -> Path:
        return self.config.run_dir / "service.pid"

    def command(self) -> str:
        """The llmtap executable the service runs."""
        if self.config.install.command:
            return self.config.install.command
        argv0 = Path(sys.argv[0])
        if argv0.name == "llmtap" and argv0.is_file():
            return str(argv0.absolute())
        return shutil.which("llmtap") or str(Path(sys.executable).parent / "llmtap")

    def run_command(self) -> list[str]:
        return [self.command(), "run", "--config", str(self.config_file_real)]

    def cleanup_command(self) -> list[str]:
        return [self.command(), "cleanup", "--config", str(self.config_file_real)]


def make_layout(config: Config, explicit: str | None) -> Layout:
    path, named = config_path(explicit)
    return Layout(config, path.absolute() if named else None)


# --- users ---------------------------------------------------------------------------------------


def lookup_user(root: Path, name: str) -> tuple[int, int] | None:
    if root == Path("/"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        return entry.pw_uid, entry.pw_gid
    for line in _lines(root / "etc/passwd"):
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == name:
            return int(fields[2]), int(fields[3])
    return None


def group_exists(root: Path, name: str) -> bool:
    if root == Path("/"):
        try:
            grp.getgrnam(name)
        except KeyError:
            return False
        return True
    return any(line.split(":")[0] == name for line in _lines(root / "etc/group"))


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _prefix(root: Path) -> list[str]:
    return [] if root == Path("/") else ["--prefix", str(root)]


def useradd_command(root: Path, name: str, group_present: bool) -> list[str]:
    group = ["--gid", name] if group_present else ["--user-group"]
    return ["useradd", *_prefix(root), "--system", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", *group, name]


# --- files ---------------------------------------------------------------------------------------


class FileChange:
    """One file written with an exact mode; undo restores what was there (or nothing)."""

    def __init__(self, path: Path, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
        self.path, self.data, self.mode, self.uid, self.gid = path, data, mode, uid, gid
        self.before: tuple[bytes, int] | None = None
        self.created_dirs: list[Path] = []

    def needed(self) -> bool:
        try:
            st = self.path.stat()
            return (self.path.read_bytes() != self.data or st.st_mode & 0o7777 != self.mode
                    or (st.st_uid, st.st_gid) != (self.uid, self.gid))
        except FileNotFoundError:
            return True

    def apply(self) -> None:
        if self.path.exists():
            self.before = (self.path.read_bytes(), self.path.stat().st_mode & 0o7777)
        self.created_dirs = make_dirs(self.path.parent)
        write_file(self.path, self.data, self.mode, self.uid, self.gid)

    def undo(self) -> None:
        if self.before is not None:
            write_file(self.path, self.before[0], self.before[1], self.uid, self.gid)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        remove_dirs(self.created_dirs)


def make_dirs(path: Path, mode: int = 0o755) -> list[Path]:
    """mkdir -p; the directories it created, outermost first."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    for directory in missing:
        directory.mkdir(mode=mode)
        os.chmod(directory, mode)
    return missing


def remove_dirs(created: list[Path]) -> None:
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            directory.rmdir()


def remove_file(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


# --- steps ---------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    needed: Callable[[], bool]
    apply: Callable[[], str]  # returns what it did, one line
    undo: Callable[[], None]


def run_steps(steps: list[Step], report: Report, after_each: Callable[[Step], None] | None = None
              ) -> list[Step]:
    """Runs the needed steps; on a failure undoes them (the failed one too) in reverse order."""
    done: list[Step] = []
    for step in steps:
        if not step.needed():
            continue
        try:
            report(step.apply())
            done.append(step)
            if after_each:
                after_each(step)
        except Exception as exc:  # a bug must roll back too
            problems = rollback([*done, step])
            outcome = (f"rolled back {len(done)} step(s), the machine is as before" if not problems
                       else "rollback incomplete: " + "; ".join(problems))
            raise RuntimeFailure(f"step {step.name!r} failed: {describe(exc)}; {outcome}") from None
    return done


def describe(exc: BaseException) -> str:
    if isinstance(exc, LlmtapError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}"


def rollback(steps: list[Step]) -> list[str]:
    problems = []
    for step in reversed(steps):
        try:
            step.undo()
        except Exception as exc:
            problems.append(f"could not undo {step.name!r}: {describe(exc)}")
    return problems


# --- install -------------------------------------------------------------------------------------


def validate_for_install(config: Config) -> None:
    """What the loader cannot know: the config must be usable by a daemon started from it."""
    paths = {"state_dir": config.state_dir, "records_dir": config.records_dir,
             "run_dir": config.run_dir, "install.root": config.install.root,
             "install.public_dir": config.install.public_dir,
             "install.profile_script": config.install.profile_script,
             "install.environment_file": config.install.environment_file,
             "install.unit_dir": config.install.unit_dir, "install.log_file": config.install.log_file}
    for key, path in paths.items():
        if not path.is_absolute():
            raise UsageError(f"{key} must be an absolute path, not {str(path)!r}")
    if config.install.service not in SERVICE_KINDS:
        raise UsageError(f"install.service must be one of {', '.join(SERVICE_KINDS)}, "
                         f"not {config.install.service!r}")
    if config.install.trust not in TRUST_CHOICES:
        raise UsageError(f"install.trust must be one of {', '.join(TRUST_CHOICES)}, "
                         f"not {config.install.trust!r}")
    if not USER_RE.match(config.service_user):
        raise UsageError(f"service_user {config.service_user!r} is not a valid user name")


class Installer:
    def __init__(self, config: Config, explicit_config: str | None = None,
                 system: System | None = None, report: Report = print) -> None:
        self.config = config
        self.layout = make_layout(config, explicit_config)
        self.system = system or System()
        self.report = report
        self.notes: list[str] = []

    # --- shared helpers ---

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
        with contextlib.suppress(LlmtapError):
            status = control.request(self.config.control_socket, {"cmd": "status"}, timeout_s=2)
            return bool(status and status.get("running"))
        return False

    # --- install ---

    def preflight(self, trust: bool, service: bool) -> tuple[DistroTrustStore | None, str | None]:
        """Every refusal happens here, before the first change."""
        self.require_root("llmtap install")
        validate_for_install(self.config)
        self.system.choose_backend(self.config.redirect.backend)
        store = self.trust_store() if trust else None
        kind = self.service_kind() if service else None
        if kind is not None:
            command = Path(self.layout.command())
            if not (command.is_file() and os.access(command, os.X_OK)):
                raise UsageError(f"the llmtap command {command} is not an executable file: set "
                                 "install.command")
            if not self.daemon_answers() and not self.service(kind).is_running():
                self.system.check_port(self.config.redirect.proxy_port)
        return store, kind

    def install(self, trust: bool = True, service: bool = True) -> list[str]:
        store, kind = self.preflight(trust, service)
        manifest = Manifest(self.layout.manifest)
        steps = self.install_steps(store, kind, manifest)
        try:
            done = run_steps(steps, self.report, after_each=lambda s: manifest.save_if_possible())
        except RuntimeFailure:
            manifest.restore()
            raise
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
        steps = [self.user_step(manifest), self.dirs_step(manifest)]
        if self.layout.explicit_config is None:
            steps.append(self.config_step(manifest))
        steps += [self.ca_step(), self.public_step()]
        if store is not None:
            steps.append(self.os_trust_step(store, manifest))
            if nss := self.nss_store():
                steps.append(self.nss_step(nss))
            if java := self.java_store():
                steps.append(self.java_step(java))
        steps.append(self.env_step(manifest))
        if kind is not None:
            steps.append(self.service_step(kind, manifest))
        steps.append(manifest.step())
        return steps

    def user_step(self, manifest: Manifest) -> Step:
        name, root = self.config.service_user, self.layout.root
        runner = self.system.runner
        created_group = [False]

        def apply() -> str:
            group_present = group_exists(root, name)
            created_group[0] = not group_present
            result = runner(useradd_command(root, name, group_present))
            if not result.ok:
                raise RuntimeFailure(f"useradd failed: {result.reason()}")
            manifest.data["created_user"] = True
            return f"created system user and group {name} (uid {self.user()[0]})"

        def undo() -> None:
            if lookup_user(root, name) is not None:
                runner(["userdel", *_prefix(root), name])
            if created_group[0] and group_exists(root, name):
                runner(["groupdel", *_prefix(root), name])
            manifest.data.pop("created_user", None)

        return Step(f"system user {name}", lambda: lookup_user(root, name) is None, apply, undo)

    def dirs_step(self, manifest: Manifest) -> Step:
        config = self.config
        created: list[Path] = []
        changed: list[tuple[Path, int, int, int]] = []

        def wanted() -> list[tuple[Path, int, int, int]]:
            uid, gid = self.user()
            return [(config.state_dir, 0o700, uid, gid), (config.records_dir, 0o750, uid, gid),
                    (config.run_dir, 0o755, 0, 0), (self.layout.public_dir, 0o755, 0, 0)]

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
                    f"(0750), run {config.run_dir}, public {self.layout.public_dir}")

        def undo() -> None:
            for path in reversed(created):
                shutil.rmtree(path, ignore_errors=True)  # made by this run: all in it is ours
            for path, mode, uid, gid in changed:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(path, uid, gid)
                    os.chmod(path, mode)

        return Step("directories", needed, apply, undo)

    def config_step(self, manifest: Manifest) -> Step:
        change = FileChange(self.layout.config_file, CONFIG_TEMPLATE.encode(), 0o644)

        def apply() -> str:
            change.apply()
            manifest.add_dirs(change.created_dirs)
            manifest.data["created_config"] = str(self.layout.config_file_real)
            return f"wrote the default config {self.layout.config_file_real}"

        def undo() -> None:
            change.undo()
            manifest.data.pop("created_config", None)

        return Step("config file", lambda: not self.layout.config_file.exists(), apply, undo)

    def ca_step(self) -> Step:
        ca_dir = self.config.ca_dir
        created = [False]
        hosts = self.config.targets.all_hosts
        key_file = ca_dir / ca.KEY_AND_CERT

        def apply() -> str:
            created[0] = not ca_dir.exists()
            uid, gid = self.user()
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
            self.notes.append(f"warning: the CA does not cover {', '.join(missing)}: run "
                              "`sudo llmtap ca rotate`")
        return Step("certificate authority", lambda: not key_file.exists(), apply, undo)

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

    def public_step(self) -> Step:
        changes: list[FileChange] = []

        def needed() -> bool:
            if not ca.public_cert_path(self.config.ca_dir).exists():
                return True  # the CA step creates it in this run
            return any(change.needed() for change in self.public_files())

        def apply() -> str:
            changes[:] = self.public_files()
            for change in changes:
                change.apply()
            return (f"published the CA for every user: {self.layout.public_cert_real} and the "
                    f"bundle {self.layout.public_bundle_real} (system roots + CA)")

        def undo() -> None:
            for change in reversed(changes):
                change.undo()

        return Step("public CA files", needed, apply, undo)

    def os_trust_step(self, store: DistroTrustStore, manifest: Manifest) -> Step:
        def apply() -> str:
            store.trust(self.layout.public_cert)
            if not store.is_trusted(self.layout.public_cert):
                raise RuntimeFailure(f"{store.name} ran but the CA is not in {store.bundle}")
            manifest.data["trust"] = type(store).__name__
            return f"trusted the CA in the OS store ({store.name})"

        def needed() -> bool:
            return not (self.layout.public_cert.exists()
                        and store.is_trusted(self.layout.public_cert))

        return Step(f"OS trust ({store.name})", needed, apply, store.untrust)

    def nss_step(self, nss: NssTrustStore) -> Step:
        def apply() -> str:
            nss.trust(self.layout.public_cert)
            dirs = ", ".join(str(db.directory) for db in nss.databases)
            return f"trusted the CA in {len(nss.databases)} NSS database(s) (Chrome/Firefox): {dirs}"

        def needed() -> bool:
            return not (self.layout.public_cert.exists() and nss.is_trusted(self.layout.public_cert))

        return Step("NSS databases (certutil)", needed, apply, nss.untrust)

    def java_step(self, java: JavaTrustStore) -> Step:
        def apply() -> str:
            java.trust(self.layout.public_cert)
            return f"trusted the CA in Java's keystore {java.keystore} (JetBrains IDEs, JVM tools)"

        def needed() -> bool:
            return not (self.layout.public_cert.exists() and java.is_trusted(self.layout.public_cert))

        return Step("Java keystore (keytool)", needed, apply, java.untrust)

    def env_files(self) -> list[FileChange]:
        values = env_values(self.layout.public_cert_real, self.layout.public_bundle_real)
        return [FileChange(self.layout.profile_script, profile_script(values).encode(), 0o644),
                FileChange(self.layout.environment_file, environment_d(values).encode(), 0o644)]

    def env_step(self, manifest: Manifest) -> Step:
        changes = self.env_files()

        def apply() -> str:
            for change in changes:
                change.apply()
                manifest.add_dirs(change.created_dirs)
            names = ", ".join(env_values(Path(), Path()))
            return (f"set {names} for every session: {self.config.install.profile_script} and "
                    f"{self.config.install.environment_file}")

        def undo() -> None:
            for change in reversed(changes):
                change.undo()

        return Step("runtime environment", lambda: any(c.needed() for c in changes), apply, undo)

    def service_step(self, kind: str, manifest: Manifest) -> Step:
        service = self.service(kind)

        def needed() -> bool:
            current = not isinstance(service, SystemdService) or service.is_installed()
            return not (current and service.is_running())

        log_dirs: list[Path] = []
        new_log = not self.layout.log_file.exists()

        def apply() -> str:
            if isinstance(service, DetachedService):
                log_dirs[:] = make_dirs(self.layout.log_file.parent)
                manifest.add_dirs(log_dirs)
            service.install(self.layout.run_command())
            service.start()
            self.system.wait_ready(self.config, service)
            manifest.data["service"] = kind
            if isinstance(service, DetachedService):
                keeper, daemon = service.pids() or (0, 0)
                return (f"systemd is not running here: started `llmtap run` detached (keeper pid "
                        f"{keeper}, daemon pid {daemon}), restarted on failure, log "
                        f"{self.config.install.log_file}; it does not start at boot: run "
                        "`sudo llmtap install` again after a reboot")
            unit = service.unit_file if isinstance(service, SystemdService) else kind
            return f"installed and started the systemd service {unit}"

        def undo() -> None:
            service.uninstall()
            self.system.cleanup_rules()
            manifest.data.pop("service", None)
            if new_log and isinstance(service, DetachedService):
                remove_file(self.layout.log_file)
            remove_dirs(log_dirs)

        return Step(f"service ({kind})", needed, apply, undo)

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
        actions: list[tuple[str, Callable[[], str | None]]] = [
            ("service", self.remove_services),
            ("rules", self.remove_rules),
            ("runtime environment", self.remove_env),
            ("NSS databases", self.remove_nss),
            ("Java keystore", self.remove_java),
            ("OS trust", lambda: self.remove_os_trust(manifest)),
            ("public CA files", self.remove_public),
            ("run directory", self.remove_run_dir),
        ]
        if purge:
            actions += [("data", self.remove_data), ("config file", lambda: self.remove_config(manifest)),
                        ("system user", lambda: self.remove_user(manifest))]
        actions.append(("directories", lambda: remove_created_dirs(manifest, purge)))
        return run_removals(actions, self.report, self.config, purge, "sudo llmtap uninstall --purge")

    def remove_services(self) -> str | None:
        removed = []
        systemd = self.service("systemd")
        assert isinstance(systemd, SystemdService)
        if systemd.unit_file.exists():
            systemd.uninstall()
            removed.append(f"removed the systemd service {systemd.unit_file}")
        detached = self.service("detached")
        if detached.is_running():
            detached.uninstall()
            removed.append("stopped the detached llmtap service")
        remove_file(self.layout.keeper_pidfile)
        return "; ".join(removed) or None

    def remove_rules(self) -> str | None:
        removed = self.system.cleanup_rules()
        return f"removed llmtap rules ({', '.join(removed)})" if removed else None

    def remove_env(self) -> str | None:
        paths = [self.layout.profile_script, self.layout.environment_file]
        removed = [str(p) for p in paths if remove_file(p)]
        return f"removed {', '.join(removed)}" if removed else None

    def remove_java(self) -> str | None:
        java = self.java_store()
        if java is None or not java.holds():
            return None
        java.untrust()
        return f"removed the CA from Java's keystore {java.keystore}"

    def remove_nss(self) -> str | None:
        nss = self.nss_store()
        holders = nss.holders() if nss else []
        if not nss or not holders:
            return None
        NssTrustStore(holders, self.system.runner).untrust()
        return f"removed the CA from {len(holders)} NSS database(s)"

    def remove_os_trust(self, manifest: Manifest) -> str | None:
        try:
            store = self.trust_store()
        except UsageError:
            recorded = manifest.data.get("trust")
            if not recorded:
                return None  # an unknown distribution was never trusted by us
            family = {"DebianTrustStore": "debian", "FedoraTrustStore": "fedora",
                      "ArchTrustStore": "arch"}.get(recorded, "auto")
            store = self.trust_store(family)
        if not store.is_anchored():
            return None
        store.untrust()
        return f"removed the CA from the OS store ({store.name})"

    def remove_public(self) -> str | None:
        removed = [p for p in (self.layout.public_cert, self.layout.public_bundle) if remove_file(p)]
        with contextlib.suppress(OSError):
            self.layout.public_dir.rmdir()  # only when empty: the config may live there
        return f"removed {', '.join(map(str, removed))}" if removed else None

    def remove_run_dir(self) -> str | None:
        return remove_run_dir(self.config.run_dir,
                              ("control.sock", "llmtap.pid", "upstream-ca.pem", "service.pid"))

    def remove_data(self) -> str | None:
        return remove_data(self.config, self.layout.log_file)

    def remove_config(self, manifest: Manifest) -> str | None:
        created = manifest.data.get("created_config")
        if not created or Path(created) != self.layout.config_file_real:
            return None  # the user's own file: never ours to delete
        if not remove_file(self.layout.config_file):
            return None
        with contextlib.suppress(OSError):
            self.layout.config_file.parent.rmdir()
        return f"deleted {created}"

    def remove_user(self, manifest: Manifest) -> str | None:
        name, root = self.config.service_user, self.layout.root
        if not manifest.data.get("created_user"):
            if lookup_user(root, name) is not None:
                self.report(f"kept user {name}: `llmtap install` did not create it")
            return None
        messages = []
        if lookup_user(root, name) is not None:
            result = self.system.runner(["userdel", *_prefix(root), name])
            if not result.ok:
                raise RuntimeFailure(f"userdel failed: {result.reason()}")
            messages.append(f"deleted user {name}")
        if group_exists(root, name):
            result = self.system.runner(["groupdel", *_prefix(root), name])
            if not result.ok:
                raise RuntimeFailure(f"groupdel failed: {result.reason()}")
            messages.append(f"deleted group {name}")
        return "; ".join(messages) or None

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
            remove_file(rotation.old_cert_file)
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


def remove_run_dir(run_dir: Path, names: Iterable[str]) -> str | None:
    """The daemon's run files, then the directory if nothing else is left in it."""
    if not run_dir.is_dir():
        return None
    for name in names:
        remove_file(run_dir / name)
    with contextlib.suppress(OSError):
        run_dir.rmdir()
        return f"removed {run_dir}"
    return None


def remove_data(config: Config, log_file: Path) -> str | None:
    """--purge: the records, the state (CA, secrets) and the service's log."""
    removed = []
    for path in (config.records_dir, config.state_dir):
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(str(path))
    if remove_file(log_file):
        removed.append(str(log_file))
    return f"deleted {', '.join(removed)}" if removed else None


def run_removals(actions: list[tuple[str, Callable[[], str | None]]], report: Callable[[str], None],
                 config: Config, purge: bool, purge_command: str) -> list[str]:
    """Runs every removal, keeps going past failures, then says what was kept or went wrong."""
    done, problems = [], []
    for name, action in actions:
        try:
            if message := action():
                done.append(message)
                report(message)
        except (LlmtapError, OSError) as exc:
            problems.append(f"{name}: {exc}")
    if not purge and config.state_dir.exists():
        report(f"kept {config.state_dir} (CA, secrets), {config.records_dir} and the config: "
               f"`{purge_command}` deletes them")
    if problems:
        raise RuntimeFailure("uninstall incomplete: " + "; ".join(problems))
    if not done:
        report("nothing to remove: llmtap is not installed")
    return done


class Rotation:
    """`llmtap ca rotate` as steps: every place that trusted the old CA trusts the new one."""

    def __init__(self, installer: Installer) -> None:
        self.installer = installer
        config, layout = installer.config, installer.layout
        self.hosts = config.targets.all_hosts
        self.key_file = config.ca_dir / ca.KEY_AND_CERT
        self.cert_file = ca.public_cert_path(config.ca_dir)
        self.old_cert_file = config.ca_dir / "previous-ca.pem"
        self.uid, self.gid = installer.user()
        self.old = (self.key_file.read_bytes(), self.cert_file.read_bytes())
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
        self.new = ca.create_ca(self.hosts)
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

    def write(self, key_file: bytes, cert: bytes) -> None:
        write_file(self.key_file, key_file, 0o600, self.uid, self.gid)
        write_file(self.cert_file, cert, 0o644, self.uid, self.gid)

    def restore_old(self) -> None:
        self.write(*self.old)

    def write_new(self) -> str:
        key, cert = self.new
        self.write(key + cert, cert)
        return f"issued a new CA, name-constrained to {len(self.hosts)} target domains"

    def old_cert(self) -> Path:
        write_file(self.old_cert_file, self.old[1], 0o644)
        return self.old_cert_file

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


def remove_created_dirs(manifest: Manifest, purge: bool) -> str | None:
    """The directories install had to create (e.g. /etc/environment.d), once they are empty."""
    removed = []
    for directory in sorted(manifest.data.get("created_dirs", []), key=len, reverse=True):
        with contextlib.suppress(OSError):
            Path(directory).rmdir()
            removed.append(directory)
    if removed and not purge:
        manifest.data["created_dirs"] = [d for d in manifest.data["created_dirs"] if d not in removed]
        manifest.save_if_possible()
    return f"removed the empty directories {', '.join(removed)}" if removed else None


class FileChangeSet:
    """Several FileChange computed when applied (their content depends on earlier steps)."""

    def __init__(self, make: Callable[[], list[FileChange]]) -> None:
        self.make = make
        self.changes: list[FileChange] = []

    def apply(self) -> str:
        self.changes = self.make()
        for change in self.changes:
            change.apply()
        return f"updated {', '.join(str(c.path) for c in self.changes)}"

    def undo(self) -> None:
        for change in reversed(self.changes):
            change.undo()


class Manifest:
    """What install did that uninstall cannot tell by looking: kept in state_dir/install.json,
    saved after every step so an interrupted install can still be undone."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.original: bytes | None = path.read_bytes() if path.is_file() else None
        try:
            self.data: dict[str, Any] = json.loads(self.original or b"{}")
        except ValueError:
            self.data = {}

    def restore(self) -> None:
        """Back to the file as it was before this run (after a rollback)."""
        if self.original is None:
            remove_file(self.path)
        elif self.path.parent.is_dir():
            write_file(self.path, self.original, 0o600)

    def add_dirs(self, created: list[Path]) -> None:
        known = set(self.data.get("created_dirs", []))
        self.data["created_dirs"] = sorted(known | {str(d) for d in created})

    def render(self) -> bytes:
        return (json.dumps(self.data, indent=2, sort_keys=True) + "\n").encode()

    def save_if_possible(self) -> None:
        if self.path.parent.is_dir():
            write_file(self.path, self.render(), 0o600)

    def step(self) -> Step:
        def apply() -> str:
            self.save_if_possible()
            return f"recorded the installation in {self.path}"

        return Step("install record", lambda: self.original != self.render(), apply, self.restore)


# --- what the runtimes are told ------------------------------------------------------------------


def env_values(cert: Path, bundle: Path) -> dict[str, str]:
    values = dict.fromkeys(ENV_FOR_CERT, str(cert))
    values.update(dict.fromkeys(ENV_FOR_BUNDLE, str(bundle)))
    return values


QUOTE, ESCAPED_QUOTE = "'", "'\\''"  # a ' inside a single-quoted sh word
ENV_HEADER = ("Written by `sudo llmtap install`, removed by `sudo llmtap uninstall`: do not edit.\n"
              "Runtimes that do not read the OS trust store learn llmtap's CA from these.")


def profile_script(values: dict[str, str]) -> str:
    lines = [f"# {line}" for line in ENV_HEADER.splitlines()]
    lines += [f"export {name}='{value.replace(QUOTE, ESCAPED_QUOTE)}'" for name, value in values.items()]
    return "\n".join(lines) + "\n"


def environment_d(values: dict[str, str]) -> str:
    lines = [f"# {line}" for line in ENV_HEADER.splitlines()]
    lines += [f"{name}={value}" for name, value in values.items()]
    return "\n".join(lines) + "\n"


def parse_profile_script(text: str) -> dict[str, str]:
    """The variables of our profile script (what a new login shell gets)."""
    values = {}
    for line in text.splitlines():
        match = re.match(r"^export ([A-Z_]+)='(.*)'$", line.strip())
        if match:
            values[match.group(1)] = match.group(2).replace(ESCAPED_QUOTE, QUOTE)
    return values


def ca_bundle(system_roots: bytes, cert_pem: bytes) -> bytes:
    """The system roots without any llmtap CA (the OS store may hold ours already), plus ours."""
    kept = []
    for block in PEM_BLOCK.findall(system_roots):
        try:
            with warnings.catch_warnings():  # some distribution roots have odd serial numbers
                warnings.simplefilter("ignore")
                subject = x509.load_pem_x509_certificate(block).subject.rfc4514_string().encode()
        except ValueError:
            continue
        if LLMTAP_CA_CN not in subject:
            kept.append(block)
    return b"\n".join(kept) + (b"\n" if kept else b"") + cert_pem
