"""Windows service: a real service through pywin32, or a scheduled task where pywin32 is missing.

The pywin32 service hosts `llmtap run` in its own process (inprocess.py beside it, on the service's
thread): a service stop asks the runner to stop, which removes the redirect before the service
reports stopped (a console-less child could not be sent CTRL_BREAK). When the runner fails on its
own, the process ends abnormally, which makes the service control manager restart it (failure
actions).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from llmtap.errors import LlmtapError, RuntimeFailure
from llmtap.platform.base import ServiceManager
from llmtap.platform.runner import Runner, SubprocessRunner
from llmtap.platform.windows.elevation import ElevationCheck, is_elevated, require_elevated
from llmtap.platform.windows.sc import ScQuery

SERVICE_NAME = "llmtap"
DISPLAY_NAME = "llmtap"
DESCRIPTION = "Sees, secures and accounts for every LLM API call made on this machine."
SERVICE_CLASS = "llmtap.platform.windows.service.LlmtapService"
COMMAND_OPTION = "command"  # the service's registry Parameters value holding the JSON argv
TASK_NAME = "llmtap"
TASK_NS = "http://schemas.microsoft.com/windows/2004/02/mit/task"
LOCAL_SYSTEM_SID = "S-1-5-18"
SERVICE_STOP_REASON = "service stop"
STOP_WAIT_HINT_MS = 30_000  # the runner's proxy stop takes up to 10 s; the SCM waits this long

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
        """As `sc query` reports it (no pywin32 needed to ask: status and doctor)."""
        return ScQuery(SERVICE_NAME, self.runner).state() == "RUNNING"

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


class StoppableRunner(Protocol):
    """inprocess.InProcessRunner, as the host sees it."""

    def run(self) -> int: ...

    def request_stop(self, reason: str = ...) -> None: ...


def config_from_command(command: list[str]) -> str | None:
    """The --config of the `llmtap run` command the service was installed with (None: the
    default, or LLMTAP_CONFIG)."""
    for i, arg in enumerate(command):
        if arg == "--config" and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def make_inprocess_runner(config_file: str | None) -> StoppableRunner:
    from llmtap.config import load_config
    from llmtap.platform.windows import inprocess  # mitmproxy: only the service process pays

    return inprocess.make_runner(load_config(config_file))


class ServiceHost:
    """`llmtap run` inside the service's own process: SvcDoRun runs it (on the service's
    thread, where no signal arrives) and SvcStop asks it to stop from the control thread, so the
    redirect is removed before the service reports stopped. A stop that comes before the runner
    exists is kept and handed to it."""

    def __init__(
        self, command: list[str],
        make_runner: Callable[[str | None], StoppableRunner] = make_inprocess_runner,
        log_error: Callable[[str], None] = print,
    ) -> None:
        self.command = command
        self.make_runner = make_runner
        self.log_error = log_error
        self._lock = threading.Lock()
        self._runner: StoppableRunner | None = None
        self.stop_requested = False

    def run(self) -> int:
        """The runner's exit code; a failure to start it is one line in the log and exit 1/2."""
        try:
            runner = self.make_runner(config_from_command(self.command))
            with self._lock:
                self._runner = runner
                if self.stop_requested:
                    runner.request_stop(SERVICE_STOP_REASON)
            code = runner.run()
        except LlmtapError as exc:
            self.log_error(f"llmtap: {exc}")
            return exc.exit_code
        except Exception as exc:  # never silent: the event log says what happened
            self.log_error(f"llmtap failed: {type(exc).__name__}: {exc}")
            return 1
        if code != 0:
            self.log_error(f"llmtap exited with code {code}")
        return code

    def stop(self) -> None:
        with self._lock:
            self.stop_requested = True
            if self._runner is not None:
                self._runner.request_stop(SERVICE_STOP_REASON)

    def must_restart(self, code: int) -> bool:
        """A failure nobody asked for: the service control manager should restart it."""
        return code != 0 and not self.stop_requested


def redirect_output(log_file: Path) -> None:
    """pythonservice.exe has no console: stderr (the runner's logging, mitmproxy's startup
    errors) goes to the log file instead of nowhere."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    stream = log_file.open("a", encoding="utf-8", errors="replace", buffering=1)
    sys.stdout = sys.stderr = stream
    logging.basicConfig(level=logging.INFO, format="%(asctime)s llmtap: %(message)s",
                        stream=stream, force=True)


def abnormal_exit(code: int) -> None:
    """Ending the process without reporting SERVICE_STOPPED is what makes the service control
    manager apply the failure actions (restart)."""
    logging.shutdown()
    os._exit(code)


def _define_service_class() -> type:
    import servicemanager
    import win32service
    import win32serviceutil
    from llmtap.config import load_config

    class LlmtapService(win32serviceutil.ServiceFramework):  # type: ignore[misc]  # pywin32 is untyped
        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION

        def __init__(self, args: Any) -> None:
            super().__init__(args)
            command = json.loads(win32serviceutil.GetServiceCustomOption(SERVICE_NAME,
                                                                         COMMAND_OPTION) or "[]")
            self.host = ServiceHost(command, log_error=servicemanager.LogErrorMsg)

        def SvcStop(self) -> None:
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=STOP_WAIT_HINT_MS)
            self.host.stop()

        def SvcDoRun(self) -> None:
            with contextlib.suppress(Exception):  # a bad config is reported by the runner itself
                redirect_output(load_config(config_from_command(self.host.command))
                                .install.log_file)
            code = self.host.run()
            if self.host.must_restart(code):
                abnormal_exit(code)

    return LlmtapService


if sys.platform == "win32" and importlib.util.find_spec("win32serviceutil") is not None:
    LlmtapService = _define_service_class()  # what pythonservice.exe loads (SERVICE_CLASS)
