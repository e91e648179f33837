"""Windows service: a real service through pywin32, or a scheduled task where pywin32 is missing.

The pywin32 service is a thin host: it runs the llmtap command as a child in its own process
group, asks it to stop with CTRL_BREAK (so it removes its redirect) and exits abnormally when the
child dies, which makes the service control manager restart it (failure actions).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtap.errors import RuntimeFailure
from llmtap.platform.base import ServiceManager
from llmtap.platform.runner import Runner, SubprocessRunner
from llmtap.platform.windows.elevation import ElevationCheck, is_elevated, require_elevated

SERVICE_NAME = "llmtap"
DISPLAY_NAME = "llmtap"
DESCRIPTION = "Sees, secures and accounts for every LLM API call made on this machine."
SERVICE_CLASS = "llmtap.platform.windows.service.LlmtapService"
COMMAND_OPTION = "command"  # the service's registry Parameters value holding the JSON argv
TASK_NAME = "llmtap"
TASK_NS = "http://schemas.microsoft.com/windows/2004/02/mit/task"
LOCAL_SYSTEM_SID = "S-1-5-18"
CREATE_NEW_PROCESS_GROUP = 0x00000200  # subprocess.CREATE_NEW_PROCESS_GROUP (Windows only)
STOP_GRACE_S = 20.0

# Win32 error codes the service manager answers with.
ERROR_SERVICE_ALREADY_RUNNING = 1056
ERROR_SERVICE_DOES_NOT_EXIST = 1060
ERROR_SERVICE_NOT_ACTIVE = 1062
ERROR_SERVICE_EXISTS = 1073


# --- the scheduled task (pure rendering, golden-tested) ------------------------------------------


def render_task_xml(command: list[str], description: str = DESCRIPTION) -> str:
    """A Task Scheduler 1.2 definition: SYSTEM, elevated, at boot, and every 5 minutes if it died
    (RestartOnFailure only covers a failed start; IgnoreNew makes the repetition a no-op while
    it runs)."""
    ET.register_namespace("", TASK_NS)
    task = _el(None, "Task", version="1.2")
    info = _el(task, "RegistrationInfo")
    _el(info, "Description", text=description)
    _el(info, "URI", text=f"\\{TASK_NAME}")
    triggers = _el(task, "Triggers")
    _el(_el(triggers, "BootTrigger"), "Enabled", text="true")
    timer = _el(triggers, "TimeTrigger")
    _el(_el(timer, "Repetition"), "Interval", text="PT5M")
    _el(timer, "StartBoundary", text="2000-01-01T00:00:00")
    _el(timer, "Enabled", text="true")
    principal = _el(_el(task, "Principals"), "Principal", id="Author")
    _el(principal, "UserId", text=LOCAL_SYSTEM_SID)
    _el(principal, "RunLevel", text="HighestAvailable")
    settings = _el(task, "Settings")
    for name, value in (
        ("MultipleInstancesPolicy", "IgnoreNew"),
        ("DisallowStartIfOnBatteries", "false"),
        ("StopIfGoingOnBatteries", "false"),
        ("StartWhenAvailable", "true"),
        ("Enabled", "true"),
        ("ExecutionTimeLimit", "PT0S"),  # never stopped for running too long
    ):
        _el(settings, name, text=value)
    restart = _el(settings, "RestartOnFailure")
    _el(restart, "Interval", text="PT1M")
    _el(restart, "Count", text="999")
    exec_ = _el(_el(task, "Actions", Context="Author"), "Exec")
    _el(exec_, "Command", text=command[0])
    if command[1:]:
        _el(exec_, "Arguments", text=subprocess.list2cmdline(command[1:]))
    ET.indent(task)
    body = ET.tostring(task, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-16"?>\n{body}\n'


def _el(parent: ET.Element | None, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    name = f"{{{TASK_NS}}}{tag}"
    element = ET.Element(name, attrs) if parent is None else ET.SubElement(parent, name, attrs)
    element.text = text
    return element


def schtasks_commands(xml_file: Path) -> dict[str, list[str]]:
    return {
        "create": ["schtasks", "/Create", "/TN", TASK_NAME, "/XML", str(xml_file), "/F"],
        "query": ["schtasks", "/Query", "/TN", TASK_NAME],
        "run": ["schtasks", "/Run", "/TN", TASK_NAME],
        "end": ["schtasks", "/End", "/TN", TASK_NAME],
        "delete": ["schtasks", "/Delete", "/TN", TASK_NAME, "/F"],
    }


def task_state_command() -> list[str]:
    # Get-ScheduledTask's State is an enum name (Running, Ready, ...), the same in every locale.
    return ["powershell", "-NoProfile", "-NonInteractive", "-Command",
            f"(Get-ScheduledTask -TaskName '{TASK_NAME}').State"]


class ScheduledTask(ServiceManager):
    name = "schtasks"

    def __init__(
        self, runner: Runner | None = None, elevated: ElevationCheck = is_elevated
    ) -> None:
        self.runner = runner or SubprocessRunner()
        self.elevated = elevated

    @classmethod
    def available(cls) -> bool:
        return sys.platform == "win32"

    def install(self, command: list[str]) -> None:
        require_elevated("installing the llmtap task", self.elevated)
        with tempfile.TemporaryDirectory(prefix="llmtap-task-") as tmp:
            xml_file = Path(tmp) / "llmtap.xml"
            xml_file.write_text(render_task_xml(command), encoding="utf-16")
            self._run(schtasks_commands(xml_file)["create"], "creating the llmtap task")

    def uninstall(self) -> None:
        require_elevated("removing the llmtap task", self.elevated)
        commands = schtasks_commands(Path())
        if self.runner(commands["query"]).ok:
            self.runner(commands["end"])
            self._run(commands["delete"], "deleting the llmtap task")

    def start(self) -> None:
        self._run(schtasks_commands(Path())["run"], "starting the llmtap task")

    def stop(self) -> None:
        self.runner(schtasks_commands(Path())["end"])  # not running: nothing to end

    def is_running(self) -> bool:
        result = self.runner(task_state_command())
        return result.ok and result.stdout.strip() == "Running"

    def _run(self, argv: list[str], doing: str) -> None:
        result = self.runner(argv)
        if not result.ok:
            raise RuntimeFailure(f"{doing} failed: {result.reason()}")


# --- the pywin32 service ------------------------------------------------------------------------


def failure_actions_command() -> list[str]:
    """Restart after 5 s, twice, then after 30 s; the count resets after a day."""
    return ["sc.exe", "failure", SERVICE_NAME, "reset=", "86400",
            "actions=", "restart/5000/restart/5000/restart/30000"]


class Win32Api:
    """The two pywin32 modules the manager uses, so tests can hand in fakes."""

    def __init__(self, serviceutil: Any, service: Any) -> None:
        self.serviceutil = serviceutil
        self.service = service

    @classmethod
    def load(cls) -> Win32Api:
        return cls(importlib.import_module("win32serviceutil"),
                   importlib.import_module("win32service"))


class WindowsService(ServiceManager):
    name = "winservice"

    def __init__(
        self, api: Win32Api | None = None, runner: Runner | None = None,
        elevated: ElevationCheck = is_elevated,
    ) -> None:
        self._api = api
        self.runner = runner or SubprocessRunner()
        self.elevated = elevated

    @property
    def api(self) -> Win32Api:
        if self._api is None:
            self._api = Win32Api.load()
        return self._api

    @classmethod
    def available(cls) -> bool:
        return sys.platform == "win32" and importlib.util.find_spec("win32serviceutil") is not None

    def install(self, command: list[str]) -> None:
        require_elevated("installing the llmtap service", self.elevated)
        util, svc = self.api.serviceutil, self.api.service
        try:
            util.InstallService(SERVICE_CLASS, SERVICE_NAME, DISPLAY_NAME,
                                startType=svc.SERVICE_AUTO_START, description=DESCRIPTION)
        except Exception as exc:
            if _winerror(exc) != ERROR_SERVICE_EXISTS:
                reason = _describe(exc)
                raise RuntimeFailure(f"installing the llmtap service failed: {reason}") from None
            util.ChangeServiceConfig(SERVICE_CLASS, SERVICE_NAME,
                                     startType=svc.SERVICE_AUTO_START, description=DESCRIPTION)
        util.SetServiceCustomOption(SERVICE_NAME, COMMAND_OPTION, json.dumps(command))
        result = self.runner(failure_actions_command())
        if not result.ok:
            raise RuntimeFailure(f"setting the service's restart policy failed: {result.reason()}")

    def uninstall(self) -> None:
        require_elevated("removing the llmtap service", self.elevated)
        self.stop()
        self._call("removing the llmtap service", self.api.serviceutil.RemoveService,
                   ignore=(ERROR_SERVICE_DOES_NOT_EXIST,))

    def start(self) -> None:
        self._call("starting the llmtap service", self.api.serviceutil.StartService,
                   ignore=(ERROR_SERVICE_ALREADY_RUNNING,))

    def stop(self) -> None:
        self._call("stopping the llmtap service", self.api.serviceutil.StopService,
                   ignore=(ERROR_SERVICE_NOT_ACTIVE, ERROR_SERVICE_DOES_NOT_EXIST))

    def is_running(self) -> bool:
        try:
            status = self.api.serviceutil.QueryServiceStatus(SERVICE_NAME)
        except Exception as exc:
            if _winerror(exc) == ERROR_SERVICE_DOES_NOT_EXIST:
                return False
            raise RuntimeFailure(f"querying the llmtap service failed: {_describe(exc)}") from None
        return bool(status[1] == self.api.service.SERVICE_RUNNING)

    def _call(self, doing: str, function: Callable[[str], Any], ignore: tuple[int, ...]) -> None:
        try:
            function(SERVICE_NAME)
        except Exception as exc:
            if _winerror(exc) not in ignore:
                raise RuntimeFailure(f"{doing} failed: {_describe(exc)}") from None


def _winerror(exc: BaseException) -> int | None:
    """pywintypes.error carries (winerror, funcname, strerror)."""
    code = getattr(exc, "winerror", None)
    if code is None and exc.args and isinstance(exc.args[0], int):
        code = exc.args[0]
    return code


def _describe(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None) or (exc.args[-1] if exc.args else "")
    return str(strerror or type(exc).__name__)


def service_manager(elevated: ElevationCheck = is_elevated) -> ServiceManager:
    """The pywin32 service where pywin32 is installed, else the scheduled task."""
    if WindowsService.available():
        return WindowsService(elevated=elevated)
    return ScheduledTask(elevated=elevated)


# --- the service host (runs inside pythonservice.exe) ---------------------------------------------


def send_ctrl_break(child: subprocess.Popen[bytes]) -> None:
    child.send_signal(getattr(signal, "CTRL_BREAK_EVENT"))  # noqa: B009 (Windows-only name)


def supervise(
    command: list[str],
    stop_requested: Callable[[float], bool],
    popen: Callable[..., Any] = subprocess.Popen,
    interrupt: Callable[[Any], None] = send_ctrl_break,
    grace_s: float = STOP_GRACE_S,
) -> int:
    """Runs `command` until it exits (its exit code) or a stop is requested (then 0).

    `stop_requested(timeout_s)` waits up to timeout_s for the service's stop event.
    """
    child = popen(command, creationflags=CREATE_NEW_PROCESS_GROUP)
    while True:
        if stop_requested(1.0):
            interrupt(child)  # the daemon removes its redirect and exits
            try:
                child.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            return 0
        code = child.poll()
        if code is not None:
            return int(code)


def _define_service_class() -> type:
    import os

    import servicemanager
    import win32event
    import win32service
    import win32serviceutil

    class LlmtapService(win32serviceutil.ServiceFramework):
        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION

        def __init__(self, args: Any) -> None:
            super().__init__(args)
            self._stop = win32event.CreateEvent(None, 0, 0, None)

        def SvcStop(self) -> None:
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)
            win32event.SetEvent(self._stop)

        def SvcDoRun(self) -> None:
            command = json.loads(win32serviceutil.GetServiceCustomOption(SERVICE_NAME,
                                                                         COMMAND_OPTION))

            def stop_requested(timeout_s: float) -> bool:
                waited = win32event.WaitForSingleObject(self._stop, int(timeout_s * 1000))
                return bool(waited == win32event.WAIT_OBJECT_0)

            code = supervise(command, stop_requested)
            if code != 0:
                # Ending the process abnormally is what makes the SCM apply the failure actions.
                servicemanager.LogErrorMsg(f"llmtap exited with code {code}; restarting")
                os._exit(code)

    return LlmtapService


if sys.platform == "win32" and importlib.util.find_spec("win32serviceutil") is not None:
    LlmtapService = _define_service_class()  # what pythonservice.exe loads (SERVICE_CLASS)
