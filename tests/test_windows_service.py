"""Windows service: the scheduled task as a document, the pywin32 service through a fake API,
and the child host that runs llmtap inside the service."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.runner import Completed
from llmtap.platform.windows import service
from llmtap.platform.windows.service import ScheduledTask, Win32Api, WindowsService

FIXTURES = Path(__file__).parent / "fixtures" / "windows"
COMMAND = [r"C:\Program Files\llmtap\llmtap.exe", "run", "--config",
           r"C:\ProgramData\llmtap\config.toml"]
NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}


class FakeRunner:
    def __init__(self) -> None:
        self.answers: dict[tuple[str, ...], Completed] = {}
        self.calls: list[list[str]] = []
        self.task_xml: bytes | None = None

    def __call__(self, argv: list[str], stdin: str | None = None) -> Completed:
        self.calls.append(argv)
        if argv[:2] == ["schtasks", "/Create"]:
            self.task_xml = Path(argv[argv.index("/XML") + 1]).read_bytes()
        return self.answers.get(tuple(argv), Completed(0))


def yes() -> bool:
    return True


def no() -> bool:
    return False


# --- the scheduled task ------------------------------------------------------------------------


def parse_task(document: bytes) -> ET.Element:
    root = ET.fromstring(document)
    assert root.tag == f"{{{NS['t']}}}Task"
    return root


def test_task_xml_is_golden() -> None:
    golden = (FIXTURES / "llmtap-task.xml").read_text()
    assert service.render_task_xml(COMMAND) == golden


def test_task_is_a_valid_document_with_what_a_service_needs() -> None:
    task = parse_task(service.render_task_xml(COMMAND).encode("utf-16"))
    assert task.get("version") == "1.2"
    assert task.findtext("t:Principals/t:Principal/t:UserId", namespaces=NS) == "S-1-5-18"
    assert task.findtext("t:Principals/t:Principal/t:RunLevel", namespaces=NS) == "HighestAvailable"
    assert task.find("t:Triggers/t:BootTrigger", NS) is not None
    assert task.findtext("t:Settings/t:ExecutionTimeLimit", namespaces=NS) == "PT0S"
    assert task.findtext("t:Settings/t:MultipleInstancesPolicy", namespaces=NS) == "IgnoreNew"
    assert task.findtext("t:Settings/t:DisallowStartIfOnBatteries", namespaces=NS) == "false"
    assert task.findtext("t:Actions/t:Exec/t:Command", namespaces=NS) == COMMAND[0]
    arguments = task.findtext("t:Actions/t:Exec/t:Arguments", namespaces=NS)
    assert arguments == r"run --config C:\ProgramData\llmtap\config.toml"


def test_task_arguments_are_quoted_and_escaped() -> None:
    command = ["llmtap.exe", "run", "--config", r"C:\My Files\a&b<c>.toml"]
    task = parse_task(service.render_task_xml(command).encode("utf-16"))
    assert task.findtext("t:Actions/t:Exec/t:Arguments", namespaces=NS) == (
        r'run --config "C:\My Files\a&b<c>.toml"'
    )


def test_task_install_writes_utf16_and_runs_schtasks() -> None:
    runner = FakeRunner()
    ScheduledTask(runner, elevated=yes).install(COMMAND)
    (create,) = runner.calls
    assert create[:4] == ["schtasks", "/Create", "/TN", "llmtap"]
    assert create[4] == "/XML" and create[6:] == ["/F"]
    assert runner.task_xml is not None
    assert runner.task_xml.startswith(b"\xff\xfe")  # UTF-16 with its BOM, as schtasks wants it
    assert runner.task_xml.decode("utf-16") == service.render_task_xml(COMMAND)
    assert not Path(create[5]).exists()


def test_task_install_needs_elevation() -> None:
    runner = FakeRunner()
    with pytest.raises(UsageError, match="Administrator"):
        ScheduledTask(runner, elevated=no).install(COMMAND)
    assert runner.calls == []


def test_task_uninstall() -> None:
    runner = FakeRunner()
    ScheduledTask(runner, elevated=yes).uninstall()
    assert runner.calls == [
        ["schtasks", "/Query", "/TN", "llmtap"],
        ["schtasks", "/End", "/TN", "llmtap"],
        ["schtasks", "/Delete", "/TN", "llmtap", "/F"],
    ]
    runner = FakeRunner()
    runner.answers[("schtasks", "/Query", "/TN", "llmtap")] = Completed(
        1, "", "ERROR: The system cannot find the file specified.\r\n")
    ScheduledTask(runner, elevated=yes).uninstall()
    assert runner.calls == [["schtasks", "/Query", "/TN", "llmtap"]]


def test_task_start_stop_and_state() -> None:
    runner = FakeRunner()
    task = ScheduledTask(runner, elevated=yes)
    task.start()
    task.stop()
    assert runner.calls == [["schtasks", "/Run", "/TN", "llmtap"],
                            ["schtasks", "/End", "/TN", "llmtap"]]
    state = tuple(service.task_state_command())
    runner.answers[state] = Completed(0, "Running\r\n")
    assert task.is_running() is True
    runner.answers[state] = Completed(0, "Ready\r\n")
    assert task.is_running() is False


def test_task_errors_are_one_line() -> None:
    runner = FakeRunner()
    runner.answers[("schtasks", "/Run", "/TN", "llmtap")] = Completed(
        1, "", "ERROR: The system cannot find the file specified.\r\n\r\n")
    with pytest.raises(RuntimeFailure) as caught:
        ScheduledTask(runner, elevated=yes).start()
    assert str(caught.value) == (
        "starting the llmtap task failed: ERROR: The system cannot find the file specified."
    )


# --- the pywin32 service, through a fake API ------------------------------------------------------


class Win32Error(Exception):
    """pywintypes.error's shape: (winerror, funcname, strerror)."""

    def __init__(self, winerror: int, funcname: str, strerror: str) -> None:
        super().__init__(winerror, funcname, strerror)
        self.winerror = winerror
        self.strerror = strerror


class FakeServiceUtil:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.raises: dict[str, Exception] = {}
        self.status = (16, 4, 0, 0, 0, 0, 0)  # SERVICE_WIN32_OWN_PROCESS, SERVICE_RUNNING

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            if name in self.raises:
                raise self.raises[name]
            return self.status if name == "QueryServiceStatus" else None

        return call


class FakeService:
    SERVICE_AUTO_START = 2
    SERVICE_RUNNING = 4


@pytest.fixture
def util() -> FakeServiceUtil:
    return FakeServiceUtil()


@pytest.fixture
def win(util: FakeServiceUtil) -> tuple[WindowsService, FakeRunner]:
    runner = FakeRunner()
    return WindowsService(Win32Api(util, FakeService), runner, elevated=yes), runner


def test_service_install(win: tuple[WindowsService, FakeRunner], util: FakeServiceUtil) -> None:
    manager, runner = win
    manager.install(COMMAND)
    assert util.calls == [
        ("InstallService",
         ("llmtap.platform.windows.service.LlmtapService", "llmtap", "llmtap"),
         {"startType": 2, "description": service.DESCRIPTION}),
        ("SetServiceCustomOption", ("llmtap", "command", json.dumps(COMMAND)), {}),
    ]
    assert runner.calls == [["sc.exe", "failure", "llmtap", "reset=", "86400",
                             "actions=", "restart/5000/restart/5000/restart/30000"]]


def test_service_reinstall_updates_it(
    win: tuple[WindowsService, FakeRunner], util: FakeServiceUtil
) -> None:
    util.raises["InstallService"] = Win32Error(1073, "CreateService", "The specified service "
                                               "already exists.")
    win[0].install(COMMAND)
    assert [name for name, _, _ in util.calls] == [
        "InstallService", "ChangeServiceConfig", "SetServiceCustomOption"]


def test_service_install_failure_is_one_line(
    win: tuple[WindowsService, FakeRunner], util: FakeServiceUtil
) -> None:
    util.raises["InstallService"] = Win32Error(5, "OpenSCManager", "Access is denied.")
    with pytest.raises(RuntimeFailure) as caught:
        win[0].install(COMMAND)
    assert str(caught.value) == "installing the llmtap service failed: Access is denied."


def test_service_needs_elevation(util: FakeServiceUtil) -> None:
    manager = WindowsService(Win32Api(util, FakeService), FakeRunner(), elevated=no)
    with pytest.raises(UsageError, match="needs Administrator rights"):
        manager.install(COMMAND)
    with pytest.raises(UsageError):
        manager.uninstall()
    assert util.calls == []


def test_service_lifecycle_tolerates_the_expected_states(
    win: tuple[WindowsService, FakeRunner], util: FakeServiceUtil
) -> None:
    manager, _ = win
    util.raises["StopService"] = Win32Error(1062, "ControlService", "The service has not been "
                                            "started.")
    util.raises["StartService"] = Win32Error(1056, "StartService", "An instance of the service "
                                             "is already running.")
    manager.start()
    manager.stop()
    manager.uninstall()
    assert [name for name, _, _ in util.calls] == [
        "StartService", "StopService", "StopService", "RemoveService"]
    assert manager.is_running() is True
    util.raises["QueryServiceStatus"] = Win32Error(1060, "OpenService", "The specified service "
                                                   "does not exist as an installed service.")
    assert manager.is_running() is False


def test_service_start_failure(win: tuple[WindowsService, FakeRunner], util: FakeServiceUtil) -> None:
    util.raises["StartService"] = Win32Error(1053, "StartService", "The service did not respond "
                                             "to the start or control request in a timely fashion.")
    with pytest.raises(RuntimeFailure, match=r"^starting the llmtap service failed: The service"):
        win[0].start()


def test_choice_off_windows_is_the_task() -> None:
    assert WindowsService.available() is False
    assert isinstance(service.service_manager(), ScheduledTask)


# --- the child host inside the service -------------------------------------------------------------


class FakeChild:
    def __init__(self, exits_after: int | None = None, code: int = 0, hangs: bool = False) -> None:
        self.polls = 0
        self.exits_after = exits_after
        self.code = code
        self.hangs = hangs
        self.events: list[str] = []

    def poll(self) -> int | None:
        self.polls += 1
        return self.code if self.exits_after is not None and self.polls >= self.exits_after else None

    def wait(self, timeout: float | None = None) -> int:
        self.events.append(f"wait {timeout}")
        if self.hangs and timeout is not None:
            raise subprocess.TimeoutExpired("llmtap", timeout)
        return self.code

    def kill(self) -> None:
        self.events.append("kill")


def test_a_dying_child_ends_the_service_with_its_code() -> None:
    child = FakeChild(exits_after=3, code=7)
    started: list[tuple[list[str], int]] = []

    def popen(command: list[str], creationflags: int) -> FakeChild:
        started.append((command, creationflags))
        return child

    assert service.supervise(COMMAND, lambda t: False, popen=popen) == 7
    assert started == [(COMMAND, 0x00000200)]  # its own process group, for CTRL_BREAK


def test_a_stop_asks_the_child_to_clean_up() -> None:
    child = FakeChild()
    asked: list[FakeChild] = []
    code = service.supervise(COMMAND, lambda t: True, popen=lambda c, creationflags: child,
                             interrupt=asked.append, grace_s=3)
    assert code == 0
    assert asked == [child]
    assert child.events == ["wait 3"]


def test_a_child_that_ignores_the_stop_is_killed() -> None:
    child = FakeChild(hangs=True)
    service.supervise(COMMAND, lambda t: True, popen=lambda c, creationflags: child,
                      interrupt=lambda c: None, grace_s=1)
    assert child.events == ["wait 1", "kill", "wait None"]


def test_supervise_a_real_process() -> None:
    def popen(command: list[str], creationflags: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(command)

    waited: list[float] = []

    def stop_requested(timeout_s: float) -> bool:
        waited.append(timeout_s)
        return False

    code = service.supervise([sys.executable, "-c", "raise SystemExit(3)"], stop_requested,
                             popen=popen)
    assert code == 3 and waited
