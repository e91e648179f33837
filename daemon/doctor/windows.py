"""`llmtap doctor` on Windows: the service and the firewall rule behind the loopback-only listener
(the trust and runtime checks are the common ones)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmtap.doctor import Check, fail, ok

if TYPE_CHECKING:
    from llmtap.install.windows import WindowsInstaller


def service(windows: WindowsInstaller, status: dict[str, Any] | None) -> Check:
    installed = windows.service()
    if not (status and status.get("running")):
        return fail("service", "the llmtap daemon is not running",
                    "llmtap install (elevated)" if not installed.is_running()
                    else f"see {windows.config.install.log_file}")
    pid = status.get("pid")
    if installed.is_running():
        return ok("service", f"running as the Windows {installed.name} llmtap (pid {pid})")
    return Check("service", "warn", f"running (pid {pid}) but not as a service",
                 "llmtap install (elevated; starts it at boot and restarts it on failure)")


def firewall(windows: WindowsInstaller) -> Check:
    """The second wall behind the loopback-only listener (llmtap.platform.windows.firewall)."""
    port = windows.config.redirect.proxy_port
    if windows.firewall.in_place(port):
        return ok("firewall", f"inbound TCP {port} from other hosts is blocked")
    return fail("firewall", f"no llmtap rule blocks inbound TCP {port} from other hosts "
                "(the proxy still listens on loopback only)", "llmtap install (elevated)")
