"""macOS launchd daemon: the plist as a document, and the launchctl commands."""

from __future__ import annotations

import plistlib
import stat
from collections.abc import Callable
from pathlib import Path

import paths
import pytest
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.macos import launchd
from llmtap.platform.macos.launchd import LaunchdService
from llmtap.platform.runner import Completed

FIXTURES = paths.FIXTURES / "macos"
COMMAND = ["/usr/local/bin/llmtap", "run", "--config", "/etc/llmtap/config.toml"]
LAUNCHCTL = "/bin/launchctl"
TARGET = "system/com.llmtap.daemon"
NOT_LOADED = Completed(113, "", 'Could not find service "com.llmtap.daemon" in domain for system')


class FakeRunner:
    def __init__(self) -> None:
        self.answers: dict[tuple[str, ...], Completed] = {}
        self.hooks: dict[tuple[str, ...], Callable[[], None]] = {}
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], stdin: str | None = None) -> Completed:
        self.calls.append(argv)
        if hook := self.hooks.get(tuple(argv)):
            hook()
        return self.answers.get(tuple(argv), Completed(0))


def test_plist_round_trips_with_the_required_keys() -> None:
    document = launchd.render_plist(COMMAND)
    assert document.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE plist')
    parsed = plistlib.loads(document)
    assert parsed["Label"] == "com.llmtap.daemon"
    assert parsed["ProgramArguments"] == COMMAND
    assert parsed["KeepAlive"] is True
    assert parsed["RunAtLoad"] is True
    assert parsed["ExitTimeOut"] >= 20  # time to remove the rules after SIGTERM
    assert plistlib.dumps(parsed, sort_keys=True) == document


def test_plist_is_golden() -> None:
    assert launchd.render_plist(COMMAND) == (FIXTURES / "com.llmtap.daemon.plist").read_bytes()


def test_odd_arguments_stay_intact() -> None:
    command = ["/Applications/llm tap/llmtap", "run", "--config", "/tmp/a&b<c>.toml"]
    assert plistlib.loads(launchd.render_plist(command))["ProgramArguments"] == command


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def service(runner: FakeRunner, tmp_path: Path) -> LaunchdService:
    return LaunchdService(runner, plist_dir=tmp_path / "LaunchDaemons")


def test_install_writes_the_plist_and_bootstraps(service: LaunchdService, runner: FakeRunner) -> None:
    runner.answers[(LAUNCHCTL, "print", TARGET)] = NOT_LOADED
    service.install(COMMAND)
    assert runner.calls == [
        [LAUNCHCTL, "print", TARGET],
        [LAUNCHCTL, "bootstrap", "system", str(service.plist)],
    ]
    assert service.plist.name == "com.llmtap.daemon.plist"
    assert plistlib.loads(service.plist.read_bytes())["ProgramArguments"] == COMMAND
    assert stat.S_IMODE(service.plist.stat().st_mode) == 0o644


def test_reinstall_replaces_the_loaded_job(service: LaunchdService, runner: FakeRunner) -> None:
    service.install(COMMAND)  # print succeeds: already loaded
    assert runner.calls == [
        [LAUNCHCTL, "print", TARGET],
        [LAUNCHCTL, "bootout", TARGET],
        [LAUNCHCTL, "bootstrap", "system", str(service.plist)],
    ]


def test_start_bootstraps_when_needed_then_kickstarts(
    service: LaunchdService, runner: FakeRunner
) -> None:
    runner.answers[(LAUNCHCTL, "print", TARGET)] = NOT_LOADED
    service.start()
    assert runner.calls == [
        [LAUNCHCTL, "print", TARGET],
        [LAUNCHCTL, "bootstrap", "system", str(service.plist)],
        [LAUNCHCTL, "kickstart", TARGET],
    ]


def test_stop_boots_out_so_keepalive_does_not_restart_it(
    service: LaunchdService, runner: FakeRunner
) -> None:
    service.stop()
    assert runner.calls == [[LAUNCHCTL, "print", TARGET], [LAUNCHCTL, "bootout", TARGET]]
    runner.calls.clear()
    runner.answers[(LAUNCHCTL, "print", TARGET)] = NOT_LOADED
    service.stop()  # not loaded: nothing to do
    assert runner.calls == [[LAUNCHCTL, "print", TARGET]]


def test_uninstall_removes_the_plist(service: LaunchdService, runner: FakeRunner) -> None:
    service.install(COMMAND)
    service.uninstall()
    assert not service.plist.exists()
    service.uninstall()  # idempotent


@pytest.mark.parametrize(
    ("fixture", "running"), [("launchctl_print_running.txt", True),
                             ("launchctl_print_stopped.txt", False)]
)
def test_is_running(service: LaunchdService, runner: FakeRunner, fixture: str, running: bool) -> None:
    runner.answers[(LAUNCHCTL, "print", TARGET)] = Completed(0, (FIXTURES / fixture).read_text())
    assert service.is_running() is running


def test_state_parsing() -> None:
    assert launchd.parse_print_state((FIXTURES / "launchctl_print_running.txt").read_text()) == "running"
    stopped = (FIXTURES / "launchctl_print_stopped.txt").read_text()
    assert launchd.parse_print_state(stopped) == "not running"
    assert launchd.parse_print_state("") is None


def test_not_running_when_not_loaded(service: LaunchdService, runner: FakeRunner) -> None:
    runner.answers[(LAUNCHCTL, "print", TARGET)] = NOT_LOADED
    assert service.is_running() is False


def test_errors_are_one_line(service: LaunchdService, runner: FakeRunner) -> None:
    runner.answers[(LAUNCHCTL, "print", TARGET)] = NOT_LOADED
    runner.answers[(LAUNCHCTL, "bootstrap", "system", str(service.plist))] = Completed(
        5, "", "Bootstrap failed: 5: Input/output error\nTry re-running the command as root\n")
    with pytest.raises(RuntimeFailure) as caught:
        service.install(COMMAND)
    assert str(caught.value) == "launchctl bootstrap failed: Bootstrap failed: 5: Input/output error"


def test_not_root_is_a_usage_error(service: LaunchdService, runner: FakeRunner) -> None:
    runner.answers[(LAUNCHCTL, "kickstart", TARGET)] = Completed(
        1, "", "Could not kickstart service: 1: Operation not permitted")
    with pytest.raises(UsageError, match="needs root"):
        service.start()
