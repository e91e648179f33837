"""Windows service: the scheduled task as a document, the pywin32 service through a fake API,
and the host that runs `llmtap run` inside the service's own process (fake pywin32 modules)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import types
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paths
import pytest
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.runner import Completed
from llmtap.platform.windows import service
from llmtap.platform.windows.service import ScheduledTask, Win32Api, WindowsService
from windows_fixtures import fixture

FIXTURES = paths.FIXTURES / "windows"
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
    runner = win[1]
    query = ("sc.exe", "query", "llmtap")
    runner.answers[query] = Completed(0, fixture("sc_query_running.txt"))
    assert manager.is_running() is True
    runner.answers[query] = Completed(0, fixture("sc_query_stopped.txt"))
    assert manager.is_running() is False
    runner.answers[query] = Completed(1060, fixture("sc_query_missing.txt"))
    assert manager.is_running() is False


def test_service_start_failure(win: tuple[WindowsService, FakeRunner], util: FakeServiceUtil) -> None:
    util.raises["StartService"] = Win32Error(1053, "StartService", "The service did not respond "
                                             "to the start or control request in a timely fashion.")
    with pytest.raises(RuntimeFailure, match=r"^starting the llmtap service failed: The service"):
        win[0].start()


def test_choice_off_windows_is_the_task() -> None:
    assert WindowsService.available() is False
    assert isinstance(service.service_manager(), ScheduledTask)


# --- the service host: `llmtap run` inside the service's process ------------------------------------


class FakeInProcess:
    """InProcessRunner's place: run() blocks until request_stop(), or ends with `code`."""

    def __init__(self, code: int | None = None, raises: BaseException | None = None) -> None:
        self.code = code
        self.raises = raises
        self.stopped = threading.Event()
        self.running = threading.Event()
        self.events: list[str] = []

    def run(self) -> int:
        self.events.append("run")
        self.running.set()
        if self.raises is not None:
            raise self.raises
        if self.code is not None:
            return self.code
        assert self.stopped.wait(10), "nobody asked the runner to stop"
        return 0

    def request_stop(self, reason: str = "requested") -> None:
        self.events.append(f"stop {reason}")
        self.stopped.set()


def test_the_host_reads_the_config_of_the_installed_command() -> None:
    assert service.config_from_command(COMMAND) == r"C:\ProgramData\llmtap\config.toml"
    assert service.config_from_command(["llmtap.exe", "run", "--config=C:/x.toml"]) == "C:/x.toml"
    assert service.config_from_command(["llmtap.exe", "run"]) is None
    assert service.config_from_command([]) is None


def test_a_service_stop_asks_the_runner_in_this_process() -> None:
    runner = FakeInProcess()
    made: list[str | None] = []

    def make(config_file: str | None) -> FakeInProcess:
        made.append(config_file)
        return runner

    host = service.ServiceHost(COMMAND, make_runner=make, log_error=pytest.fail)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(host.run()))
    thread.start()
    assert runner.running.wait(10)
    host.stop()  # from another thread, as the service control handler calls it
    thread.join(10)
    assert result == [0]
    assert made == [COMMAND[-1]]
    assert runner.events == ["run", "stop service stop"]
    assert not host.must_restart(0)


def test_a_stop_before_the_runner_exists_is_handed_to_it() -> None:
    runner = FakeInProcess()
    host = service.ServiceHost(COMMAND, make_runner=lambda _c: runner, log_error=pytest.fail)
    host.stop()
    assert host.run() == 0
    assert runner.events == ["stop service stop", "run"]


def test_a_failing_runner_is_logged_and_restarted() -> None:
    logged: list[str] = []
    host = service.ServiceHost(COMMAND, make_runner=lambda _c: FakeInProcess(code=1),
                               log_error=logged.append)
    assert host.run() == 1
    assert host.must_restart(1)
    assert logged == ["llmtap exited with code 1"]


def test_errors_before_the_runner_runs_are_one_line_with_their_exit_code() -> None:
    logged: list[str] = []

    def bad_config(_config_file: str | None) -> FakeInProcess:
        raise UsageError("unknown config key 'nope'")

    host = service.ServiceHost(COMMAND, make_runner=bad_config, log_error=logged.append)
    assert host.run() == 2
    host = service.ServiceHost(COMMAND, make_runner=lambda _c: FakeInProcess(
        raises=RuntimeError("boom")), log_error=logged.append)
    assert host.run() == 1
    assert logged == ["llmtap: unknown config key 'nope'", "llmtap failed: RuntimeError: boom"]


def test_a_failure_after_a_stop_was_asked_is_not_restarted() -> None:
    host = service.ServiceHost(COMMAND, make_runner=lambda _c: FakeInProcess(code=1),
                               log_error=lambda _m: None)
    host.stop()
    assert not host.must_restart(host.run())


def test_output_goes_to_the_log_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    log_file = tmp_path / "logs" / "llmtap.log"
    try:
        service.redirect_output(log_file)
        print("from the proxy thread", file=sys.stderr)
        logging.getLogger("llmtap").info("intercepting")
    finally:
        stream = sys.stderr
        logging.basicConfig(force=True, handlers=[logging.NullHandler()])
        stream.close()
    text = log_file.read_text()
    assert "from the proxy thread" in text and "llmtap: intercepting" in text


# --- the service class itself, with fake pywin32 modules --------------------------------------------


class FakeFramework:
    def __init__(self, args: Any) -> None:
        self.args = args
        self.reported: list[tuple[int, dict[str, Any]]] = []

    def ReportServiceStatus(self, status: int, **kwargs: Any) -> None:
        self.reported.append((status, kwargs))


@pytest.fixture
def service_class(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """LlmtapService made from fake win32serviceutil, win32service and servicemanager."""
    seen: dict[str, Any] = {"log": [], "exit": [], "redirected": []}
    config = tmp_path / "config.toml"
    config.write_text(f'[install]\nlog_file = "{tmp_path / "llmtap.log"}"\n')
    util = types.ModuleType("win32serviceutil")
    util.ServiceFramework = FakeFramework  # type: ignore[attr-defined]
    util.GetServiceCustomOption = lambda name, option: json.dumps(  # type: ignore[attr-defined]
        ["llmtap.exe", "run", "--config", str(config)]) if (name, option) == ("llmtap", "command") else None
    svc = types.ModuleType("win32service")
    svc.SERVICE_STOP_PENDING = 3  # type: ignore[attr-defined]
    manager = types.ModuleType("servicemanager")
    manager.LogErrorMsg = seen["log"].append  # type: ignore[attr-defined]
    for module in (util, svc, manager):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(service, "abnormal_exit", seen["exit"].append)
    monkeypatch.setattr(service, "redirect_output", seen["redirected"].append)
    seen["class"] = service._define_service_class()
    seen["config"] = config
    yield seen


def test_svc_stop_stops_the_runner_inside_svc_do_run(service_class: dict[str, Any]) -> None:
    runner = FakeInProcess()
    instance = service_class["class"](("llmtap",))
    assert instance._svc_name_ == "llmtap"
    instance.host.make_runner = lambda config_file: runner
    thread = threading.Thread(target=instance.SvcDoRun)
    thread.start()
    assert runner.running.wait(10)
    instance.SvcStop()
    thread.join(10)
    assert not thread.is_alive()
    assert instance.reported == [(3, {"waitHint": 30_000})]
    assert runner.events == ["run", "stop service stop"]
    assert service_class["exit"] == [] and service_class["log"] == []
    assert service_class["redirected"] == [service_class["config"].parent / "llmtap.log"]


def test_svc_do_run_ends_the_process_abnormally_when_the_runner_fails(
    service_class: dict[str, Any]
) -> None:
    instance = service_class["class"](("llmtap",))
    seen_config: list[str | None] = []

    def make(config_file: str | None) -> FakeInProcess:
        seen_config.append(config_file)
        return FakeInProcess(code=1)

    instance.host.make_runner = make
    instance.SvcDoRun()
    assert seen_config == [str(service_class["config"])]
    assert service_class["exit"] == [1]  # the SCM's failure actions restart it
    assert service_class["log"] == ["llmtap exited with code 1"]
