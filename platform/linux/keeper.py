"""The service where systemd is not PID 1 (containers, WSL, minimal systems).

`llmtap install` starts a detached keeper (`python -m llmtap.platform.linux.keeper SPEC`) that
runs `llmtap run` and does for it what the systemd unit would: restart on failure (not after
exit code 2, a bad config), never giving up but waiting longer the more often it failed lately
(doubling per start within BURST_WINDOW_S, at most MAX_RESTART_SEC), run `llmtap cleanup` after
every exit, and stop it on SIGTERM. Its pidfile holds "<keeper pid> <daemon pid>". It does not
start at boot: there is no init system to ask.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from llmtap.atomic import write_atomic
from llmtap.errors import RuntimeFailure
from llmtap.platform.base import ServiceManager

MODULE = "llmtap.platform.linux.keeper"
RESTART_SEC = 2.0
MAX_RESTART_SEC = 60.0
BURST_WINDOW_S = 300.0
NO_RESTART_CODES = (0, 2)  # clean stop; bad config or usage
STOP_TIMEOUT_S = 40.0
START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class KeeperSpec:
    command: list[str]
    cleanup: list[str]
    pidfile: str
    restart_sec: float = RESTART_SEC


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{stamp} llmtap keeper: {message}", file=sys.stderr, flush=True)


class Keeper:
    def __init__(self, spec: KeeperSpec) -> None:
        self.spec = spec
        self.stopping = False
        self.child: subprocess.Popen[bytes] | None = None
        self.starts: list[float] = []

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            while not self.stopping:
                code = self._run_once()
                self._cleanup()
                if self.stopping or code in NO_RESTART_CODES:
                    return 0 if self.stopping else code
                delay = self._delay()
                log(f"restarting in {delay:g}s")
                self._sleep(delay)
            return 0
        finally:
            with contextlib.suppress(FileNotFoundError):
                Path(self.spec.pidfile).unlink()
            log("stopped")

    def _run_once(self) -> int:
        self.starts.append(time.monotonic())
        self.child = subprocess.Popen(self.spec.command, stdin=subprocess.DEVNULL)
        self._write_pidfile(self.child.pid)
        log(f"started {' '.join(self.spec.command)} (pid {self.child.pid})")
        code = self.child.wait()
        log(f"llmtap run exited with {describe(code)}")
        return code

    def _delay(self) -> float:
        """Machines left untapped are worse than a slow retry: never give up, back off."""
        recent = [t for t in self.starts if time.monotonic() - t < BURST_WINDOW_S]
        return float(min(self.spec.restart_sec * 2 ** max(0, len(recent) - 1), MAX_RESTART_SEC))

    def _cleanup(self) -> None:
        if self.spec.cleanup:
            subprocess.run(self.spec.cleanup, stdin=subprocess.DEVNULL, check=False)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(0.1)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def _write_pidfile(self, child_pid: int) -> None:
        path = Path(self.spec.pidfile)
        write_atomic(path, f"{os.getpid()} {child_pid}\n".encode(), mode=None)


def describe(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


# --- the ServiceManager side: start, find and stop the keeper ------------------------------------

Spawn = Callable[[list[str], IO[bytes]], "subprocess.Popen[bytes]"]


def spawn_detached(argv: list[str], log_file: IO[bytes]) -> subprocess.Popen[bytes]:
    """In its own session, away from the terminal, with nothing of ours inherited."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                            start_new_session=True, close_fds=True, cwd="/")


def process_alive(pid: int) -> bool:
    """True for a live process (a zombie is dead: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


class DetachedService(ServiceManager):
    name = "detached"

    def __init__(self, pidfile: Path, log_file: Path, cleanup: list[str],
                 python: str = sys.executable, spawn: Spawn = spawn_detached) -> None:
        self.pidfile = pidfile
        self.log_file = log_file
        self.cleanup = cleanup
        self.python = python
        self.spawn = spawn
        self.command: list[str] = []

    @classmethod
    def available(cls) -> bool:
        return sys.platform.startswith("linux")

    def install(self, command: list[str]) -> None:
        self.command = list(command)

    def uninstall(self) -> None:
        self.stop()

    def argv(self) -> list[str]:
        spec = KeeperSpec(self.command, self.cleanup, str(self.pidfile))
        return [self.python, "-m", MODULE, json.dumps(asdict(spec))]

    def start(self) -> None:
        if self.is_running():
            return
        if not self.command:
            raise RuntimeFailure("the detached service has no command: install it first")
        self.pidfile.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.log_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        with os.fdopen(fd, "ab") as log_out:
            proc = self.spawn(self.argv(), log_out)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.pids() is not None:
                return
            if proc.poll() is not None:
                raise RuntimeFailure(f"the llmtap keeper exited at once: {self.last_log_line()}")
            time.sleep(0.05)
        raise RuntimeFailure(f"the llmtap keeper did not start within {START_TIMEOUT_S:g}s")

    def stop(self) -> None:
        pids = self.pids()
        if pids is None:
            with contextlib.suppress(FileNotFoundError):
                self.pidfile.unlink()  # stale
            return
        keeper, daemon = pids
        os.kill(keeper, signal.SIGTERM)
        if not wait_gone(keeper, STOP_TIMEOUT_S):
            for pid in (daemon, keeper):  # the daemon would not stop: do what systemd does
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_gone(keeper, 5)
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()

    def is_running(self) -> bool:
        return self.pids() is not None

    def pids(self) -> tuple[int, int] | None:
        """(keeper, daemon) when the pidfile names a live keeper of ours (not a reused pid)."""
        try:
            keeper, daemon = (int(x) for x in self.pidfile.read_text().split())
        except (OSError, ValueError):
            return None
        argv = cmdline(keeper)
        if not process_alive(keeper) or MODULE not in argv or not any(
                str(self.pidfile) in arg for arg in argv):
            return None
        return keeper, daemon

    def last_log_line(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no output"


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    return not process_alive(pid)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m llmtap.platform.linux.keeper SPEC_JSON", file=sys.stderr)
        return 2
    data: dict[str, Any] = json.loads(argv[0])
    return Keeper(KeeperSpec(**data)).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
