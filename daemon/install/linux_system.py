"""The Linux machine as install sees it: its paths (under `install.root`, so tests use a
temporary tree), its users, and everything outside install's own files, injectable."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmtap import ca, redirect
from llmtap.config import DEFAULT_CONFIG_PATH, Config, config_path
from llmtap.errors import UsageError
from llmtap.install.manifest import MANIFEST
from llmtap.install.ready import port_in_use, wait_for_daemon
from llmtap.platform.base import ServiceManager
from llmtap.platform.linux.keeper import DetachedService, Spawn, spawn_detached
from llmtap.platform.linux.systemd import systemd_running
from llmtap.platform.linux.trust import Which, under
from llmtap.platform.runner import Runner, SubprocessRunner

SERVICE_KINDS = ("auto", "systemd", "detached")
TRUST_CHOICES = ("auto", "debian", "fedora", "arch")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")

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


def service_hint(service: ServiceManager) -> str:
    if isinstance(service, DetachedService):
        return f"{service.last_log_line()} (log: {service.log_file})"
    return "see `journalctl -u llmtap`"


def wait_for_service(config: Config, service: ServiceManager) -> None:
    wait_for_daemon(config, service, service_hint)


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
    wait_ready: Callable[[Config, ServiceManager], None] = wait_for_service


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

