"""Linux service: a hardened systemd unit rendered from installers/llmtap.service.

The unit runs the root supervisor with only the capabilities it needs and a read-only view of
the system except its own state, records and run directories.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from llmtap.atomic import write_atomic
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.base import ServiceManager
from llmtap.platform.runner import Runner, SubprocessRunner

UNIT_NAME = "llmtap.service"
UNIT_DIR = Path("/etc/systemd/system")
SYSTEMCTL = "systemctl"
CAPABILITIES = ("CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN",
                "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_KILL")
HOME_DIRS = ("/home", "/root", "/run/user")
TMP_DIRS = ("/tmp", "/var/tmp")


def systemd_running() -> bool:
    """sd_booted(3): systemd is PID 1 exactly when this directory exists."""
    return os.path.isdir("/run/systemd/system")


def template() -> str:
    return resources.files("llmtap.installers").joinpath("llmtap.service").read_text()


def quote_exec(argv: list[str]) -> str:
    """A command line for Exec*= lines: specifiers and variables escaped, odd words quoted."""
    words = []
    for arg in argv:
        arg = arg.replace("%", "%%").replace("$", "$$")
        if not arg or re.search(r'[\s"\'\\;]', arg):
            arg = '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
        words.append(arg)
    return " ".join(words)


def _under(path: Path, tops: tuple[str, ...]) -> bool:
    return any(path == Path(top) or Path(top) in path.parents for top in tops)


@dataclass(frozen=True)
class UnitSpec:
    """What the unit must allow: the command, where it writes, and what it reads."""

    exec_start: list[str]
    exec_stop_post: list[str]
    read_write_paths: tuple[Path, ...]
    run_dir: Path = Path("/run/llmtap")
    reads: tuple[Path, ...] = field(default_factory=tuple)  # executables, interpreter, config


def render_unit(spec: UnitSpec) -> str:
    """The unit file. ProtectHome and PrivateTmp are relaxed (with the reason written in the unit)
    only when llmtap itself or its files live under /home, /root or /tmp."""
    resolved = [Path(os.path.realpath(p)) for p in (*spec.reads, *spec.read_write_paths)]
    in_home = sorted({str(p) for p in resolved if _under(p, HOME_DIRS)})
    in_tmp = sorted({str(p) for p in resolved if _under(p, TMP_DIRS)})
    writable = [p for p in spec.read_write_paths if p != spec.run_dir]
    if spec.run_dir.parent == Path("/run"):
        runtime = f"RuntimeDirectory={spec.run_dir.name}\nRuntimeDirectoryMode=0755"
    else:
        runtime = f"# run_dir {spec.run_dir} is not directly under /run: listed in ReadWritePaths"
        writable.append(spec.run_dir)
    protect_home = "ProtectHome=yes"
    if in_home:
        protect_home = f"# llmtap reads {', '.join(in_home)}: homes read-only\nProtectHome=read-only"
    private_tmp = "PrivateTmp=yes"
    if in_tmp:
        private_tmp = f"# llmtap uses {', '.join(in_tmp)}: no private /tmp\nPrivateTmp=no"
    return template().format(
        exec_start=quote_exec(spec.exec_start),
        exec_stop_post=quote_exec(spec.exec_stop_post),
        capabilities=" ".join(CAPABILITIES),
        read_write_paths=" ".join(quote_exec([f"-{p}"]) for p in writable),
        runtime_directory=runtime,
        protect_home=protect_home,
        private_tmp=private_tmp,
    )


def interpreter_of(executable: Path) -> Path | None:
    """The interpreter of a script (the `#!` line), which the service must be able to read."""
    try:
        with open(executable, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    if not words:
        return None
    if Path(words[0]).name == "env" and len(words) > 1:
        found = shutil.which(words[1])
        return Path(found) if found else None
    return Path(words[0])


class SystemdService(ServiceManager):
    name = "systemd"

    def __init__(self, spec: UnitSpec, runner: Runner | None = None, unit_dir: Path = UNIT_DIR,
                 unit_name: str = UNIT_NAME) -> None:
        self.spec = spec
        self.runner = runner or SubprocessRunner()
        self.unit_file = unit_dir / unit_name
        self.unit_name = unit_name

    @classmethod
    def available(cls) -> bool:
        return systemd_running() and shutil.which(SYSTEMCTL) is not None

    def rendered(self) -> str:
        return render_unit(self.spec)

    def is_installed(self) -> bool:
        """The unit on disk is exactly the one we would write."""
        try:
            return self.unit_file.read_text() == self.rendered()
        except OSError:
            return False

    def install(self, command: list[str]) -> None:
        self.spec = dataclasses.replace(self.spec, exec_start=list(command))
        self.unit_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(self.unit_file, self.rendered().encode(), 0o644)
        self._systemctl("daemon-reload")
        self._systemctl("enable", self.unit_name)

    def uninstall(self) -> None:
        if self.unit_file.exists():
            self.runner([SYSTEMCTL, "disable", "--now", self.unit_name])  # a stopped unit is fine
            self.unit_file.unlink()
            self._systemctl("daemon-reload")
        with contextlib.suppress(Exception):
            self.runner([SYSTEMCTL, "reset-failed", self.unit_name])

    def start(self) -> None:
        self._systemctl("restart", self.unit_name)  # a changed unit or config takes effect

    def stop(self) -> None:
        if self.unit_file.exists():
            self._systemctl("stop", self.unit_name)

    def is_running(self) -> bool:
        return self.runner([SYSTEMCTL, "is-active", "--quiet", self.unit_name]).ok

    def _systemctl(self, *args: str) -> None:
        result = self.runner([SYSTEMCTL, *args])
        if not result.ok:
            reason = result.reason()
            if "Access denied" in reason or "Interactive authentication" in reason:
                raise UsageError(f"systemctl {args[0]} needs root: run it with sudo")
            raise RuntimeFailure(f"systemctl {' '.join(args)} failed: {reason}")
