"""Is the daemon the service started up, with its rules in place? The same question on every OS."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from llmtap import control
from llmtap.config import Config
from llmtap.errors import LlmtapError, RuntimeFailure
from llmtap.platform.base import ServiceManager

READY_TIMEOUT_S = 60.0
Hint = Callable[[ServiceManager], str]  # where to look when the service did not come up


def wait_for_daemon(config: Config, service: ServiceManager, hint: Hint,
                    timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until the daemon answers with its rules in place; fails early when the service died."""
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    while time.monotonic() < deadline:
        with contextlib.suppress(LlmtapError):
            status = control.request(config.control_socket, {"cmd": "status"}, timeout_s=2)
            if status and status.get("running") and status.get("rules_present"):
                return
        if time.monotonic() - started > 3 and not service.is_running():
            raise RuntimeFailure(f"the service stopped: {hint(service)}")
        time.sleep(0.2)
    raise RuntimeFailure(f"the daemon did not become ready in {timeout_s:g}s: {hint(service)}")


def daemon_answers(config: Config) -> bool:
    """A daemon (ours or a `llmtap run`) answers on the control socket."""
    with contextlib.suppress(LlmtapError):
        status = control.request(config.control_socket, {"cmd": "status"}, timeout_s=2)
        return bool(status and status.get("running"))
    return False


def port_in_use(port: int) -> None:
    from llmtap.supervisor import listen_hosts  # imports mitmproxy: only when a service starts

    listen_hosts(port)
