"""Windows choices made outside platform/windows, run here on Linux: default paths, upstream
roots, the port probe, `llmtap install`/`uninstall`/`doctor` through Windows' tools (fake
runner, fake service), and the secret store without uids and modes."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import certifi
import pytest
from llmtap import ca, supervisor
from llmtap import secrets_store as store
from llmtap.cli import secrets as cli_secrets
from llmtap.config import Config, load_config, system_paths
from llmtap.doctor import Doctor
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.install import provider_for
from llmtap.install import windows as installer_windows
from llmtap.install.engine import unremoved
from llmtap.install.linux import LinuxInstaller
from llmtap.install.manifest import Manifest
from llmtap.install.windows import WindowsInstaller, WindowsSystem
from llmtap.platform.base import ServiceManager
from llmtap.platform.linux.trust import PEM_BLOCK
from llmtap.platform.runner import Completed
from llmtap.platform.windows import environment
from llmtap.platform.windows.trust import thumbprint
from windows_fixtures import FakeNetsh, certutil_listing, fixture
from windows_like import BLOCK_POSIX_IMPORTS

ENV_KEY = r"HKLM\SYSTEM\CurrentControlSet\Control\Session Manager\Environment"


# --- default paths -----------------------------------------------------------------------------


def test_default_paths_on_windows_are_under_programdata() -> None:
    paths = system_paths("win32", {"ProgramData": r"D:\Data"})
    assert [str(p) for p in (paths.config_file, paths.state_dir, paths.records_dir, paths.run_dir,
                             paths.public_dir, paths.log_file)] == [
        r"D:\Data\llmtap\config.toml", r"D:\Data\llmtap\state", r"D:\Data\llmtap\records",
        r"D:\Data\llmtap\run", r"D:\Data\llmtap\public", r"D:\Data\llmtap\llmtap.log"]
    assert str(system_paths("win32", {}).state_dir) == r"C:\ProgramData\llmtap\state"


def test_default_paths_elsewhere_are_unchanged() -> None:
    for platform, run in (("linux", "/run/llmtap"), ("darwin", "/var/run/llmtap")):  # macOS has no /run
        paths = system_paths(platform, {"ProgramData": r"D:\Data"})
        assert (paths.config_file, paths.state_dir, paths.records_dir, paths.run_dir) == (
            Path("/etc/llmtap/config.toml"), Path("/var/lib/llmtap"),
            Path("/var/lib/llmtap/records"), Path(run))
    config = Config()  # this process is Linux: the defaults the SPEC names
    assert (config.state_dir, config.run_dir, config.install.public_dir,
            config.install.log_file) == (Path("/var/lib/llmtap"), Path("/run/llmtap"),
                                         Path("/etc/llmtap"), Path("/var/log/llmtap.log"))


# --- upstream roots ----------------------------------------------------------------------------


def test_windows_upstream_roots_are_certifis_never_a_posix_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ca.root_bundle_candidates("win32") == [certifi.where()]
    assert ca.root_bundle_candidates("linux")[:4] == list(ca.SYSTEM_ROOT_BUNDLES)
    assert ca.root_bundle_candidates("linux")[-1] == certifi.where()
    extra = tmp_path / "extra.pem"
    extra.write_bytes(b"-----BEGIN CERTIFICATE-----\nEXTRA\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(sys, "platform", "win32")
    bundle = ca.write_upstream_bundle(tmp_path / "upstream-ca.pem", str(extra), -1, -1)
    certifi_pem = Path(certifi.where()).read_bytes()
    assert bundle.read_bytes() == certifi_pem.rstrip(b"\n") + b"\n" + extra.read_bytes()


# --- the port probe ----------------------------------------------------------------------------


class FakeSocket:
    options: ClassVar[list[tuple[int, int, int]]] = []
    bind_error: ClassVar[int | None] = None

    def __init__(self, family: int, kind: int) -> None:
        pass

    def __enter__(self) -> FakeSocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))

    def bind(self, address: tuple[str, int]) -> None:
        if self.bind_error is not None:
            raise OSError(self.bind_error, os.strerror(self.bind_error))


def test_the_port_probe_binds_exclusively_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    assert supervisor.probe_option("linux") == socket.SO_REUSEADDR
    assert supervisor.probe_option("win32") == -5  # Winsock: ~SO_REUSEADDR, which is 4 there
    monkeypatch.setattr(supervisor.socket, "socket", FakeSocket)
    monkeypatch.setattr(sys, "platform", "win32")
    FakeSocket.options, FakeSocket.bind_error = [], None
    assert supervisor.listen_hosts(8443, candidates=("0.0.0.0",)) == ("0.0.0.0",)
    assert FakeSocket.options == [(socket.SOL_SOCKET, -5, 1)]
    FakeSocket.bind_error = errno.EADDRINUSE
    with pytest.raises(UsageError, match=r"port 8443 on 0\.0\.0\.0 is already in use"):
        supervisor.listen_hosts(8443, candidates=("0.0.0.0",))


def test_the_port_probe_still_refuses_a_taken_port_here() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} on 127.0.0.1 is already in use"):
            supervisor.listen_hosts(port, candidates=("127.0.0.1",))


# --- install, uninstall and doctor on Windows ----------------------------------------------------


class WindowsBox:
    """certutil, icacls, setx and reg as a machine would answer them."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.root_store: set[str] = set()  # thumbprints
        self.env: dict[str, str] = {}
        self.fail: set[str] = set()
        self.netsh = FakeNetsh()
        self.certs: dict[str, Path] = {}  # thumbprint -> the file it was added from

    def __call__(self, argv: list[str], stdin: str | None = None) -> Completed:
        self.calls.append(argv)
        tool = argv[0]
        if tool in self.fail:
            return Completed(5, "", f"{tool}: Access is denied.")
        if tool == "certutil":
            return self.certutil(argv)
        if tool == "netsh":
            return self.netsh(argv)
        if argv[:2] == ["reg", "query"]:
            name = argv[-1]
            if name not in self.env:
                return Completed(1, "", "ERROR: The system was unable to find the specified "
                                 "registry key or value.")
            return Completed(0, f"\r\n{ENV_KEY}\r\n    {name}    REG_SZ    {self.env[name]}\r\n\r\n")
        if tool == "setx":
            self.env[argv[1]] = argv[2]
        elif argv[:2] == ["reg", "delete"]:
            self.env.pop(argv[4], None)
        return Completed(0, "SUCCESS: Specified value was saved.\r\n")

    def certutil(self, argv: list[str]) -> Completed:
        if argv[1] == "-addstore":
            self.root_store.add(thumbprint(Path(argv[-1])))
            self.certs[thumbprint(Path(argv[-1]))] = Path(argv[-1])
        elif argv[1] == "-delstore":
            self.root_store.clear()
        elif argv[1] == "-store":
            wanted = argv[-1]
            found = bool(self.root_store) if wanted == "llmtap local CA" else wanted in self.root_store
            if not found:
                return Completed(1, fixture("certutil_store_not_found.txt"))
            return Completed(0, certutil_listing(self.certs[next(iter(self.root_store))]))
        return Completed(0)

    def named(self, tool: str) -> list[list[str]]:
        return [c for c in self.calls if c[0] == tool]


class FakeService(ServiceManager):
    name = "winservice"

    def __init__(self) -> None:
        self.running = False
        self.events: list[Any] = []
        self.fail_start = False

    @classmethod
    def available(cls) -> bool:
        return True

    def install(self, command: list[str]) -> None:
        self.events.append(("install", command))

    def uninstall(self) -> None:
        self.events.append("uninstall")
        self.running = False

    def start(self) -> None:
        if self.fail_start:
            raise RuntimeFailure("starting the llmtap service failed: Access is denied.")
        self.events.append("start")
        self.running = True

    def stop(self) -> None:
        self.running = False

    def is_running(self) -> bool:
        return self.running


def write_config(root: Path) -> Path:
    config = root / "ProgramData" / "llmtap" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(textwrap.dedent(f"""\
        state_dir = "{root / 'ProgramData/llmtap/state'}"
        records_dir = "{root / 'ProgramData/llmtap/records'}"
        run_dir = "{root / 'ProgramData/llmtap/run'}"
        [targets]
        hosts = ["api.anthropic.com"]
        [install]
        public_dir = "{root / 'ProgramData/llmtap/public'}"
        log_file = "{root / 'ProgramData/llmtap/llmtap.log'}"
        """))
    return config


@pytest.fixture
def box() -> WindowsBox:
    return WindowsBox()


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def make(tmp_path: Path, box: WindowsBox, service: FakeService, monkeypatch: pytest.MonkeyPatch
         ) -> Any:
    """A WindowsInstaller on the default config (moved into tmp_path), elevated, with fakes."""
    config_file = write_config(tmp_path)
    monkeypatch.setattr(installer_windows, "DEFAULT_CONFIG_PATH", config_file)
    monkeypatch.delenv("LLMTAP_CONFIG", raising=False)
    exe = tmp_path / "Scripts" / "llmtap.exe"
    exe.parent.mkdir()
    exe.write_text("")
    waited: list[Config] = []
    config = load_config(config_file)
    config_file.unlink()  # the default config is install's to write

    def build(elevated: bool = True, **overrides: Any) -> WindowsInstaller:
        system = WindowsSystem(
            runner=box, elevated=lambda: elevated, choose_backend=lambda name: None,
            check_port=lambda port: None, cleanup_rules=list,
            service=lambda _elevated: service, wait_ready=lambda c, s: waited.append(c),
            command=lambda: str(exe), **overrides)
        return WindowsInstaller(config, None, system, report=reports.append)

    reports: list[str] = []
    build.reports = reports  # type: ignore[attr-defined]
    build.exe = exe  # type: ignore[attr-defined]
    return build


def test_install_uses_windows_tools_and_is_idempotent(make: Any, box: WindowsBox,
                                                      service: FakeService) -> None:
    installer = make()
    config = installer.config
    base = installer.config_file.parent
    done = installer.install()
    assert done == ["directories", "config file", "certificate authority", "public CA files",
                    "OS trust (certutil)", "runtime environment", "firewall rule (netsh)",
                    "service (winservice)", "install record"]
    assert make.reports[0].startswith("not on Windows: no `llmtap` user")
    private = [base, config.state_dir, config.records_dir, config.run_dir]
    assert box.named("icacls") == [
        call for d in private for call in (
            ["icacls", str(d), "/setowner", "*S-1-5-32-544", "/T", "/C", "/Q"],
            ["icacls", str(d), "/inheritance:r", "/grant:r", "*S-1-5-18:(OI)(CI)F",
             "*S-1-5-32-544:(OI)(CI)F"])
    ] + [["icacls", str(config.install.public_dir), "/grant", "*S-1-5-32-545:(OI)(CI)RX"]]
    public = config.install.public_dir / "llmtap-ca.pem"
    bundle = config.install.public_dir / "ca-bundle.pem"
    assert ["certutil", "-addstore", "-f", "Root", str(public)] in box.calls
    assert box.root_store == {thumbprint(public)}
    first_root = PEM_BLOCK.findall(Path(certifi.where()).read_bytes())[0]
    assert bundle.read_bytes().startswith(first_root)
    assert bundle.read_bytes().endswith(public.read_bytes())
    assert box.env == {"NODE_EXTRA_CA_CERTS": str(public), "SSL_CERT_FILE": str(bundle),
                       "REQUESTS_CA_BUNDLE": str(bundle), "CURL_CA_BUNDLE": str(bundle),
                       "CODEX_CA_CERTIFICATE": str(bundle)}
    assert next(c for c in box.calls if c[0] == "setx") == [
        "setx", "NODE_EXTRA_CA_CERTS", str(public), "/M"]
    assert service.events == [("install", [str(make.exe), "run", "--config",
                                           str(installer.config_file)]), "start"]
    assert "llmtap configuration" in installer.config_file.read_text()
    assert (config.ca_dir / "mitmproxy-ca.pem").exists()

    box.calls.clear()
    assert make().install() == []
    assert "nothing to change: llmtap is already installed and running" in make.reports
    assert not [c for c in box.calls if c[0] in ("icacls", "setx") or c[1] == "-addstore"]


def test_install_refuses_without_elevation_before_any_change(make: Any, box: WindowsBox) -> None:
    with pytest.raises(UsageError, match="llmtap install needs Administrator rights"):
        make(elevated=False).install()
    assert box.calls == []


def test_a_failed_step_rolls_back_every_step(make: Any, box: WindowsBox,
                                             service: FakeService) -> None:
    service.fail_start = True
    installer = make()
    with pytest.raises(RuntimeFailure, match=r"step 'service \(winservice\)' failed: starting the "
                       r"llmtap service failed: Access is denied\.; rolled back 7 step\(s\)"):
        installer.install()
    assert box.root_store == set() and box.env == {}
    assert not installer.config.state_dir.exists()
    assert not installer.config_file.exists()
    assert "uninstall" in service.events


def test_uninstall_purge_leaves_no_trace(make: Any, box: WindowsBox, service: FakeService) -> None:
    installer = make()
    installer.install()
    box.env["SSL_CERT_FILE"] = r"C:\corp\bundle.pem"  # changed by someone since: theirs now
    done = make().uninstall(purge=True)
    assert done[0] == "removed the llmtap service" and not service.running
    assert box.root_store == set()
    assert box.env == {"SSL_CERT_FILE": r"C:\corp\bundle.pem"}
    assert ["certutil", "-delstore", "Root", "llmtap local CA"] in box.calls
    assert not installer.config.state_dir.exists() and not installer.config_file.exists()
    assert not installer.config.install.public_dir.exists()
    assert make().uninstall() == []
    assert "nothing to remove: llmtap is not installed" in make.reports


def test_every_step_is_removed_by_its_tag(make: Any) -> None:
    installer = make()
    manifest = Manifest(installer.manifest_path)
    steps = installer.install_steps(True, True, manifest)
    assert [s.tag for s in steps] == ["directories", "config file", "certificate authority",
                                      "public CA files", "OS trust", "runtime environment",
                                      "firewall rule", "service", "install record"]
    assert unremoved(steps, installer.removals(manifest, purge=True)) == []
    assert unremoved(steps, installer.removals(manifest, purge=False)) == [
        "config file", "certificate authority", "install record"]


def test_the_cli_chooses_the_installer_by_platform(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    assert isinstance(provider_for(config, None, platform="win32"), WindowsInstaller)
    assert isinstance(provider_for(config, None, platform="linux"), LinuxInstaller)
    with pytest.raises(UsageError, match="not available on Windows yet"):
        provider_for(config, None, platform="win32").rotate()


def test_machine_environment_parsing() -> None:
    output = f"\r\n{ENV_KEY}\r\n    SSL_CERT_FILE    REG_SZ    C:\\Program Data\\b.pem  \r\n"
    assert environment.parse_query(output, "ssl_cert_file") == r"C:\Program Data\b.pem"
    assert environment.parse_query(output, "NODE_EXTRA_CA_CERTS") is None
    assert environment.delete_command("X") == ["reg", "delete", ENV_KEY, "/v", "X", "/f"]


class Status:
    running: ClassVar[dict[str, Any]] = {
        "running": True, "pid": 4242, "rules_present": True, "backend": "windivert",
        "scope": "targets", "ports": [443], "proxy_port": 8443,
        "targets": {"api.anthropic.com": ["192.0.2.1"]}}


def test_doctor_on_windows_checks_windows_things(make: Any, box: WindowsBox,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    installer = make()
    installer.install()
    monkeypatch.setattr("llmtap.control.request", lambda *_a, **_k: Status.running)
    probes: list[list[str]] = []

    def probe(argv: list[str], env: dict[str, str]) -> Completed:
        probes.append(argv)
        assert env["SSL_CERT_FILE"] == box.env["SSL_CERT_FILE"]  # what a new session gets
        return Completed(0, '{"ok": true, "issuer": "llmtap local CA", "source": "SSL_CERT_FILE"}')

    found = {"curl": "curl.exe", "python": "python.exe"}
    doctor = Doctor(installer.config, None, runner=probe, which=found.get, env={},
                    windows=installer)
    checks = {c.name: c for c in doctor.run()}
    assert checks["service"].status == "ok" and "Windows winservice" in checks["service"].detail
    assert checks["OS trust"].status == "ok" and "Root store" in checks["OS trust"].detail
    assert checks["NSS"].status == "skip" and "not checked on Windows" in checks["NSS"].detail
    assert checks["curl"].status == "skip" and "not checked on Windows" in checks["curl"].detail
    assert checks["environment"].status == "warn"  # this (test) shell has none of them
    assert checks["python3 (SSL_CERT_FILE)"].status == "ok"
    assert probes == [["python.exe", "-c", probes[0][2], "api.anthropic.com"]]
    assert checks["firewall"].status == "ok" and "TCP 8443" in checks["firewall"].detail
    box.root_store.clear()
    box.netsh.rules.clear()
    failed = {c.name: c for c in Doctor(installer.config, None, runner=probe, which=found.get,
                                        env={}, windows=installer).run()}
    assert failed["OS trust"].status == "fail" and failed["OS trust"].fix == "llmtap install (elevated)"
    assert failed["firewall"].status == "fail" and "loopback only" in failed["firewall"].detail


# --- the secret store without uids and modes ----------------------------------------------------


def test_the_store_on_windows_is_guarded_by_its_acl(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "POSIX_OWNERS", False)
    paths = store.StorePaths.under(tmp_path / "state")
    restricted: list[Path] = []
    store.ensure_directory(paths, -1, -1, restrict=restricted.append)
    assert restricted == [paths.directory]
    store.write_private(paths.store, b"{}", -1, -1)
    os.chmod(paths.store, 0o644)  # would be refused on POSIX: no mode bits on Windows
    store.check_permissions(paths, 12345, "nobody")
    store.check_own_store(paths)
    paths.key.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match="symbolic link"):
        store.check_own_store(paths)


def test_the_store_here_still_checks_owner_and_mode(tmp_path: Path) -> None:
    paths = store.StorePaths.under(tmp_path / "state")
    paths.directory.mkdir(parents=True, mode=0o700)
    store.write_private(paths.store, b"{}", os.getuid(), os.getgid())
    os.chmod(paths.store, 0o644)
    with pytest.raises(UsageError, match="mode 0644"):
        store.check_own_store(paths)


def test_the_secrets_cli_on_windows_needs_elevation_not_a_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "POSIX_OWNERS", False)
    asked: list[str] = []
    monkeypatch.setattr(cli_secrets, "require_root", asked.append)
    config = load_config(write_config(tmp_path))
    assert cli_secrets.service_owner(config, create=True) == cli_secrets.NO_OWNER
    cli_secrets.require_writer(cli_secrets.NO_OWNER, "llmtap secrets set")
    assert asked == ["llmtap secrets", "llmtap secrets set"]


# --- as if on Windows: the install path imports nothing POSIX-only --------------------------------

NO_POSIX = BLOCK_POSIX_IMPORTS + r'''
import os, sys
for name in ("fork", "chown", "fchown", "fchmod", "geteuid", "getuid", "getgid", "getegid"):
    delattr(os, name)
import llmtap.cli, llmtap.doctor, llmtap.install.linux, llmtap.install.windows
from llmtap import secrets_store as store
assert not store.POSIX_OWNERS
paths = store.StorePaths.under(sys.argv[1])
store.ensure_directory(paths, -1, -1, restrict=lambda d: None)
store.write_private(paths.store, b"{}", -1, -1)
store.check_own_store(paths)
store.write_store(paths, [], -1)
print("ok")
'''


def test_install_doctor_and_secrets_import_without_posix(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", NO_POSIX, str(tmp_path / "state")],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
