"""`llmtap doctor` on macOS: the checks of each install step (the runtime handshakes are the
common ones in llmtap.doctor, run with the environment a new shell gets from /etc/zshenv)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtap.doctor import Check
from llmtap.platform.linux.trust import Which
from llmtap.platform.macos import environment, pf
from llmtap.platform.macos.environment import GuiSession, console_uid
from llmtap.platform.runner import Runner

if TYPE_CHECKING:
    from llmtap.install.macos import MacInstaller

INSTALL = "sudo llmtap install"
# /usr/bin shims that, without what they front, open an "install the developer tools / Java"
# dialog instead of running: asked first with a command that only answers.
STUBS = {"/usr/bin/python3": ["/usr/bin/xcode-select", "-p"],
         "/usr/bin/java": ["/usr/libexec/java_home"]}


def check(name: str, status: str, detail: str, fix: str = "") -> Check:
    return Check(name, status, detail, fix)


def without_stubs(which: Which, runner: Runner) -> Which:
    """`which`, but None for a shim whose real tool is not installed."""
    def find(name: str) -> str | None:
        path = which(name)
        probe = STUBS.get(path or "")
        return None if probe and not runner(probe).ok else path

    return find


def service(mac: MacInstaller, status: dict[str, Any] | None) -> Check:
    launchd = mac.service()
    loaded = launchd.plist.exists()
    if not (status and status.get("running")):
        fix = (f"sudo launchctl kickstart -k {launchd.target}; see {mac.config.install.log_file}"
               if loaded else INSTALL)
        return check("service", "fail", "the llmtap daemon is not running", fix)
    pid = status.get("pid")
    if loaded and launchd.is_running():
        return check("service", "ok", f"running under launchd ({launchd.target}, pid {pid}, "
                     "KeepAlive)")
    return check("service", "warn", f"running (pid {pid}) but not as a LaunchDaemon",
                 f"{INSTALL} (starts it at boot and restarts it on failure)")


def account(mac: MacInstaller) -> Check:
    found = mac.directory.lookup(mac.account)
    if found is None:
        return check("account", "fail", f"the service account {mac.account.name} does not exist",
                     INSTALL)
    return check("account", "ok", f"{mac.account.name} ({mac.account.alias}), uid {found[0]}")


def pf_state(mac: MacInstaller, status: dict[str, Any] | None) -> Check:
    runner = mac.system.runner
    info = runner(pf.show_command("info", None))
    enabled = info.ok and pf.pf_enabled(info.stdout)
    rdr = pf.parse_rules(runner(pf.show_command("nat")).stdout)
    token = mac.paths.token_file.read_text().strip() if mac.paths.token_file.is_file() else ""
    if not (status and status.get("running")):
        if rdr or token:
            return check("pf", "warn", f"the daemon is down but left {len(rdr)} rdr rule(s) and "
                         f"{'a' if token else 'no'} pf reference", "sudo llmtap cleanup")
        return check("pf", "skip", "not checked: the daemon is not running")
    if not (enabled and rdr and token):
        missing = [what for what, there in (("pf enabled", enabled), ("rdr rules", rdr),
                                            ("reference token", token)) if not there]
        return check("pf", "fail", f"missing: {', '.join(missing)}",
                     f"sudo launchctl kickstart -k system/{mac.service().label}")
    return check("pf", "ok", f"enabled, llmtap holds reference {token} (released on stop); "
                 f"{len(rdr)} rdr rule(s) in {pf.ANCHOR}")


def keychain(mac: MacInstaller, cert: Path) -> Check:
    if cert.exists() and mac.store.is_trusted(cert):
        return check("OS trust", "ok", "the CA is a trusted root in the System keychain "
                     "(security verify-cert)")
    return check("OS trust", "fail", "the CA is not trusted in the System keychain", INSTALL)


def shell_values(mac: MacInstaller) -> dict[str, str]:
    path = mac.paths.shell_files[0]
    return environment.block_values(path.read_text()) if path.is_file() else {}


def shells(mac: MacInstaller) -> Check:
    wanted = mac.env_values()
    stale = [str(p) for p in mac.paths.shell_files
             if not (p.is_file() and environment.block_values(p.read_text()) == wanted)]
    if stale:
        return check("shell environment", "fail", f"llmtap's block is missing or stale in "
                     f"{', '.join(stale)}", INSTALL)
    return check("shell environment", "ok", f"{', '.join(wanted)} in "
                 f"{' and '.join(environment.SHELL_FILES)}")


def gui(mac: MacInstaller) -> Check:
    wanted = mac.env_values()
    agent = mac.paths.agent_plist
    if not (agent.is_file() and agent.read_bytes() == environment.render_agent(wanted)):
        return check("GUI environment", "fail", f"the LaunchAgent {agent} is missing or stale",
                     INSTALL)
    uid = console_uid(mac.system.runner)
    if uid is None:
        return check("GUI environment", "ok", "LaunchAgent in place (nobody is logged in at "
                     "the screen to check)")
    current = GuiSession(mac.system.runner).get(uid, list(wanted))
    if current != wanted:
        return check("GUI environment", "warn", f"the session of uid {uid} lacks "
                     f"{', '.join(n for n in wanted if current.get(n) != wanted[n])}",
                     "log out and back in (the LaunchAgent sets them at login)")
    return check("GUI environment", "ok", f"LaunchAgent in place; set in the session of uid {uid}")


def extra(mac: MacInstaller, status: dict[str, Any] | None) -> list[Check]:
    return [account(mac), pf_state(mac, status), shells(mac), gui(mac)]
