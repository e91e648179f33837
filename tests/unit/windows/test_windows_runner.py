"""The in-process lifecycle of `llmtap run` on Windows (no fork), run here on Linux: a fake
WinDivert backend that records each call, and the real embedded Master on a free loopback port,
asking the backend's original-destination table (WinDivert's own) for each connection."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from llmtap import control
from llmtap.cli import main
from llmtap.config import Config, MetricsConfig, load_config
from llmtap.errors import LlmtapError, RuntimeFailure, UsageError
from llmtap.platform import statusfile
from llmtap.platform.base import RedirectBackend, TargetAddresses
from llmtap.platform.runner import Completed
from llmtap.platform.windows import acl, inprocess
from llmtap.platform.windows.loopback import Flow, Flows, Redirector, Targets
from llmtap.platform.windows.service import ServiceHost
from llmtap.privileges import require_root
from llmtap.targets import Lookup, TargetResolver
from mitmproxy import ctx
from mitmproxy import platform as mitmproxy_platform
from windows_like import BLOCK_POSIX_IMPORTS

TARGET_A, TARGET_B = "192.0.2.10", "192.0.2.20"  # documentation addresses: never contacted
WAIT_S = 10.0


def free_port() -> int:
    """Free on every IPv4 and IPv6 address (where the runner listens)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("0.0.0.0", 0))
            port = int(probe.getsockname()[1])
        try:
            with socket.socket(socket.AF_INET6) as probe6:
                probe6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe6.bind(("::", port))
        except OSError:
            continue
        return port


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, asked without connecting (a connection
    would make the proxy ask the table about an unknown client)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class FakeDivert(RedirectBackend):
    """WinDivert's place: WinDivert's own table, and every call recorded with whether the proxy
    listened at that moment."""

    name = "fake-windivert"
    dies_with_owner = True
    events: ClassVar[list[tuple[Any, ...]]] = []
    instances: ClassVar[list[FakeDivert]] = []
    port: ClassVar[int] = 0
    on_install: ClassVar[Callable[[FakeDivert], None] | None] = None

    def __init__(self, plan: Any) -> None:
        super().__init__(plan)
        self.redirector = Redirector(plan.proxy_port, Targets.build(plan, TargetAddresses()),
                                     Flows(), lambda client: False)
        self.dead = False
        self.events.append(("backend", plan.proxy_port, listening(self.port)))
        self.instances.append(self)

    @classmethod
    def available(cls) -> bool:
        return True

    def install(self, addresses: TargetAddresses) -> None:
        self.events.append(("install", listening(self.port), addresses))
        if hook := FakeDivert.on_install:  # read on the class: a plain function, not a method
            hook(self)

    def update_targets(self, addresses: TargetAddresses) -> None:
        self.events.append(("update", addresses))

    def remove(self) -> None:
        self.events.append(("remove", listening(self.port)))

    def alive(self) -> bool:
        return not self.dead

    @classmethod
    def rules_present(cls) -> bool:
        return False

    @classmethod
    def cleanup_leftovers(cls) -> bool:
        cls.events.append(("cleanup",))
        return False

    def original_addr_lookup(self) -> Any:
        self.events.append(("lookup",))
        return self.redirector.original_addr


def names(events: list[tuple[Any, ...]]) -> list[str]:
    return [e[0] for e in events]


def write_config(root: Path, port: int) -> Path:
    path = root / "config.toml"
    path.write_text(textwrap.dedent(f"""\
        state_dir = "{root / 'state'}"
        records_dir = "{root / 'records'}"
        run_dir = "{root / 'run'}"
        [redirect]
        proxy_port = {port}
        [targets]
        hosts = ["llm.test"]
        """))
    return path


def resolver(answers: list[str]) -> TargetResolver:
    """Answers each refresh with the next address (the last one repeated), every 50 ms."""
    def lookup(_host: str) -> Lookup:
        return Lookup(frozenset({answers.pop(0) if len(answers) > 1 else answers[0]}), None)

    return TargetResolver(["llm.test"], grace_s=0, refresh_max_s=0.05, lookup=lookup)


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Config]:
    # Put mitmproxy's transparent-mode hooks back after the runner plugged WinDivert's table in.
    monkeypatch.setattr(mitmproxy_platform, "original_addr", mitmproxy_platform.original_addr)
    monkeypatch.setattr(mitmproxy_platform, "init_transparent_mode",
                        mitmproxy_platform.init_transparent_mode)
    port = free_port()
    FakeDivert.events, FakeDivert.instances, FakeDivert.port = [], [], port
    FakeDivert.on_install = None
    yield load_config(write_config(tmp_path, port))
    assert not listening(port), "the Master outlived the runner"


@pytest.fixture
def restricted() -> list[Path]:
    return []


@pytest.fixture
def runner(config: Config, restricted: list[Path], monkeypatch: pytest.MonkeyPatch
           ) -> inprocess.InProcessRunner:
    real = inprocess.build_master

    def spy(settings: Any, with_pipeline: bool = True, stages: Any = None) -> Any:
        table = FakeDivert.instances[-1].redirector
        FakeDivert.events.append(("master", mitmproxy_platform.original_addr == table.original_addr))
        return real(settings, with_pipeline, stages)

    monkeypatch.setattr(inprocess, "build_master", spy)
    made = inprocess.InProcessRunner(
        config, backend_cls=FakeDivert, check_rights=lambda _action: None, restrict=restricted.append
    )
    made.resolver = resolver([TARGET_A])
    return made


def run_in_thread(runner: inprocess.InProcessRunner) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["code"] = runner.run()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


class Echo:
    """A plain TCP echo server: where the table says a client wanted to go."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self.server:
            conn, _ = self.server.accept()
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)


# --- the lifecycle ------------------------------------------------------------------------------


def test_order_round_trip_refresh_status_and_stop(
    runner: inprocess.InProcessRunner, config: Config, restricted: list[Path],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    runner.resolver = resolver([TARGET_A, TARGET_B])
    thread, result = run_in_thread(runner)
    wait_for(lambda: "update" in names(FakeDivert.events), "the target refresh")
    backend = FakeDivert.instances[0]
    port = config.redirect.proxy_port
    assert FakeDivert.events[:6] == [
        ("cleanup",),  # leftovers first
        ("backend", port, False),
        ("lookup",),
        ("master", True),  # WinDivert's table was in mitmproxy before the Master existed
        ("install", True, TargetAddresses(v4=frozenset({TARGET_A}))),  # only once it listened
        ("update", TargetAddresses(v4=frozenset({TARGET_B}))),
    ]
    assert restricted == [config.state_dir, config.records_dir, config.run_dir]

    # A "redirected" connection: the proxy finds its destination in the backend's table.
    echo = Echo()
    with socket.socket() as client:
        client.bind(("127.0.0.1", 0))
        backend.redirector.flows.remember(
            client.getsockname(), Flow(("192.0.2.99", client.getsockname()[1]), ("127.0.0.1", echo.port)))
        client.settimeout(WAIT_S)
        client.connect(("127.0.0.1", port))
        client.sendall(b"ping")
        assert client.recv(16) == b"ping"

    # `llmtap status` without a control socket: the status file.
    monkeypatch.setattr(control, "UNIX_SOCKETS", False)
    wait_for(lambda: statusfile.path_for(config.control_socket).exists(), "the status file")
    report = control.request(config.control_socket, {"cmd": "status"})
    assert report is not None
    assert report["running"] and report["pid"] == report["worker_pid"] == os.getpid()
    assert report["backend"] == "fake-windivert" and report["rules_present"]
    assert report["listening"] == [f"127.0.0.1:{port}", f"::1:{port}"]  # loopback only
    with pytest.raises(SystemExit) as exited:
        main(["status", "--config", str(config.source)])
    assert exited.value.code == 0
    assert f"llmtap is running (pid {os.getpid()}" in capsys.readouterr().out

    runner.stop.set()
    thread.join(WAIT_S)
    assert result == {"code": 0}
    assert FakeDivert.events[-1] == ("remove", True)  # the redirect went while the proxy listened
    assert names(FakeDivert.events).count("remove") == 1
    assert control.request(config.control_socket, {"cmd": "status"}) is None
    assert not (config.run_dir / "llmtap.pid").exists()


def test_a_stop_signal_removes_everything_and_exits_0(
    runner: inprocess.InProcessRunner, config: Config
) -> None:
    before = signal.getsignal(signal.SIGTERM)
    FakeDivert.on_install = lambda _backend: signal.raise_signal(signal.SIGTERM)
    assert runner.run() == 0  # in the main thread: its handlers are the runner's
    assert runner.exit_reason == "SIGTERM"
    assert names(FakeDivert.events)[-2:] == ["install", "remove"]
    assert FakeDivert.events[-1] == ("remove", True)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_service_stop_from_another_thread_removes_the_redirect(
    runner: inprocess.InProcessRunner
) -> None:
    """As in the Windows service: run() on a thread that gets no signals, the stop asked from
    the service control thread (llmtap.platform.windows.service.ServiceHost)."""
    host = ServiceHost(["llmtap.exe", "run"], make_runner=lambda _config: runner,
                       log_error=pytest.fail)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(host.run()))
    thread.start()
    wait_for(lambda: "install" in names(FakeDivert.events), "the redirect")
    host.stop()
    thread.join(WAIT_S)
    assert result == [0]
    assert runner.exit_reason == "service stop"
    assert FakeDivert.events[-1] == ("remove", True)  # removed while the proxy still listened
    assert names(FakeDivert.events).count("remove") == 1


def test_a_backend_that_dies_stops_the_runner_with_exit_1(
    runner: inprocess.InProcessRunner, caplog: pytest.LogCaptureFixture
) -> None:
    def die(backend: FakeDivert) -> None:
        backend.dead = True

    FakeDivert.on_install = die
    assert runner.run() == 1
    assert FakeDivert.events[-1] == ("remove", True)
    assert "the redirect was lost" in caplog.text


def test_a_proxy_that_dies_stops_the_runner_with_exit_1(
    runner: inprocess.InProcessRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    class QuitSoon:
        def running(self) -> None:
            ctx.master.event_loop.call_later(0.3, ctx.master.shutdown)

    spy = inprocess.build_master

    def build(settings: Any, with_pipeline: bool = True, stages: Any = None) -> Any:
        made = spy(settings, with_pipeline, stages)
        made.addons.add(QuitSoon())
        return made

    monkeypatch.setattr(inprocess, "build_master", build)
    assert runner.run() == 1
    assert names(FakeDivert.events)[-2:] == ["install", "remove"]


def test_a_proxy_that_does_not_start_is_never_redirected_to(
    runner: inprocess.InProcessRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(settings: Any, with_pipeline: bool = True, stages: Any = None) -> Any:
        raise LlmtapError("no proxy today")

    monkeypatch.setattr(inprocess, "build_master", broken)
    with pytest.raises(RuntimeFailure, match="the proxy did not start"):
        runner.run()
    assert "install" not in names(FakeDivert.events)
    assert FakeDivert.events[-1] == ("remove", False)  # safe to call: nothing was installed


def test_refusal_without_administrator_rights_before_anything_starts(config: Config) -> None:
    def not_elevated(action: str) -> None:
        raise UsageError(f"{action} needs Administrator rights: run it from an elevated terminal")

    with pytest.raises(UsageError, match="llmtap run needs Administrator rights"):
        inprocess.InProcessRunner(config, backend_cls=FakeDivert, check_rights=not_elevated).run()
    assert FakeDivert.events == []


def test_metrics_are_refused_before_anything_starts(config: Config) -> None:
    config = dataclasses.replace(config, metrics=MetricsConfig(listen="127.0.0.1:9464"))
    with pytest.raises(UsageError, match=r"metrics\.listen is not available on Windows"):
        inprocess.InProcessRunner(config, backend_cls=FakeDivert,
                                  check_rights=lambda _action: None).run()
    assert FakeDivert.events == []


# --- the pieces ------------------------------------------------------------------------------------


def test_acl_command_is_golden() -> None:
    assert acl.restrict_command(Path("C:/ProgramData/llmtap")) == [
        "icacls", str(Path("C:/ProgramData/llmtap")), "/inheritance:r", "/grant:r",
        "*S-1-5-18:(OI)(CI)F", "*S-1-5-32-544:(OI)(CI)F",
    ]
    calls: list[list[str]] = []

    def refuse(argv: list[str], stdin: str | None = None) -> Completed:
        calls.append(argv)
        return Completed(5, "", "Access is denied.")

    with pytest.raises(RuntimeFailure, match=r"cannot restrict .* \(icacls\): Access is denied\."):
        acl.restrict_to_administrators(Path("C:/llmtap"), runner=refuse)
    assert calls == [acl.restrict_command(Path("C:/llmtap"))]


def test_status_file_is_only_believed_while_fresh_and_its_daemon_lives(tmp_path: Path) -> None:
    sock = tmp_path / "control.sock"
    assert statusfile.read(sock) is None
    statusfile.publish(sock, {"running": True, "pid": 4242})
    published = statusfile.path_for(sock).stat().st_mtime
    assert statusfile.read(sock, alive=lambda pid: pid == 4242) is not None
    assert statusfile.read(sock, alive=lambda _pid: False) is None  # killed: the file stayed
    stale = published + statusfile.STALE_S + 5
    assert statusfile.read(sock, now=lambda: stale, alive=lambda _pid: True) is None
    statusfile.path_for(sock).write_text("{not json")
    assert statusfile.read(sock) is None
    statusfile.withdraw(sock)
    statusfile.withdraw(sock)
    assert not statusfile.path_for(sock).exists()


def test_status_file_unreadable_says_to_elevate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    statusfile.publish(tmp_path / "control.sock", {"running": True, "pid": os.getpid()})

    def denied(*_args: Any, **_kwargs: Any) -> str:
        raise PermissionError(13, "Access is denied")

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(RuntimeFailure, match="run it from an elevated terminal"):
        statusfile.read(tmp_path / "control.sock")


def test_without_unix_sockets_the_live_feed_says_why(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "UNIX_SOCKETS", False)
    with pytest.raises(RuntimeFailure, match="use `llmtap status`"):
        control.subscribe(tmp_path / "control.sock")
    assert control.request(tmp_path / "control.sock", {"cmd": "status"}) is None


def test_require_root_means_elevated_where_there_is_no_euid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "geteuid")
    with pytest.raises(UsageError, match="llmtap cleanup needs Administrator rights"):
        require_root("llmtap cleanup")  # not elevated: there is no Windows here


# --- as if on Windows: no pwd, grp, fcntl, fork, chown, uids, SIGHUP, netlink, libc ----------------

WINDOWS_LIKE = BLOCK_POSIX_IMPORTS + r'''
import ctypes, ctypes.util, os, signal, socket, sys
real_cdll = ctypes.CDLL
def cdll(name, *args, **kwargs):
    if "libc" in str(name):
        raise FileNotFoundError(f"Could not find module {name!r}")
    return real_cdll(name, *args, **kwargs)
ctypes.CDLL, ctypes.util.find_library = cdll, lambda name: None
for name in ("fork", "chown", "fchown", "fchmod", "geteuid", "getuid", "getgid", "getegid",
             "setuid", "setgid", "setgroups", "setpgid"):
    delattr(os, name)
del signal.SIGHUP, socket.AF_NETLINK, socket.SO_PEERCRED  # AF_UNIX stays: asyncio needs it here

import llmtap.cli
from llmtap import lifecycle, redirect
from llmtap.platform.windows import inprocess
from llmtap.platform.base import RedirectBackend
from llmtap.targets import Lookup, TargetResolver

assert not hasattr(sys.modules["llmtap.privileges"], "pwd")
events = []

class Backend(RedirectBackend):
    name = "fake-windivert"
    def __init__(self, plan):
        super().__init__(plan)
        events.append("backend")
    @classmethod
    def available(cls): return True
    def install(self, addresses):
        events.append("install")
        signal.raise_signal(signal.SIGBREAK if hasattr(signal, "SIGBREAK") else signal.SIGINT)
    def update_targets(self, addresses): events.append("update")
    def remove(self): events.append("remove")
    def alive(self): return True
    @classmethod
    def rules_present(cls): return False
    @classmethod
    def cleanup_leftovers(cls): events.append("cleanup"); return False
    def original_addr_lookup(self):
        events.append("lookup")
        return lambda sock: ("192.0.2.10", 443)

redirect.choose_backend = lambda name: Backend
inprocess.require_root = lambda action: events.append("rights")
inprocess.restrict_to_administrators = lambda directory: events.append("restrict")
lifecycle.TargetResolver = lambda hosts, **kw: TargetResolver(
    hosts, lookup=lambda host: Lookup(frozenset({"192.0.2.10"}), None), **kw)
try:
    llmtap.cli.main(["run", "--config", sys.argv[1]])
except SystemExit as exc:
    print("exit", exc.code)
print(" ".join(events))
'''


def test_the_whole_run_path_works_without_posix(tmp_path: Path) -> None:
    """`llmtap run` through the CLI, with what Windows lacks taken away: the in-process runner
    is chosen, and nothing on its path (imports included) needs fork, pwd, chown or a uid."""
    config_file = write_config(tmp_path, free_port())
    result = subprocess.run([sys.executable, "-c", WINDOWS_LIKE, str(config_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "exit 0", "rights restrict restrict restrict cleanup backend lookup install remove"
    ], result.stderr
    assert "stopping (SIGINT); removing the redirect" in result.stderr
