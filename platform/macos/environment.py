"""macOS: the variables for runtimes that ignore the keychain, in shells and in GUI apps.

GUI apps (an IDE started from the Dock, Claude Desktop, a terminal app) get their environment from
launchd, not from a shell: `launchctl setenv` in the user's GUI domain reaches every process
launched after it, and a LaunchAgent in /Library/LaunchAgents runs it again at each login (the
setting does not survive a logout; /etc/launchd.conf, the old way, is ignored since 10.10). For
the session already open, install runs the same setenv as the console user (`launchctl asuser`
with `sudo -u`).

Shells not started from that session (ssh, `sudo -i`, cron) get the same lines from a tagged block
in /etc/zshenv (every zsh, interactive or not: the default shell) and /etc/profile (bash login
shells). A block is removed by its markers, so the user's own lines stay byte for byte.
"""

from __future__ import annotations

import plistlib
import re
import shlex

from llmtap.install.runtime_env import ESCAPED_QUOTE, QUOTE
from llmtap.platform.runner import Runner

LAUNCHCTL = "/bin/launchctl"
SUDO = "/usr/bin/sudo"
AGENT_LABEL = "com.llmtap.env"
AGENT_DIR = "/Library/LaunchAgents"
SHELL_FILES = ("/etc/zshenv", "/etc/profile")
BEGIN = "# >>> llmtap: written by `sudo llmtap install`, removed by `sudo llmtap uninstall` >>>"
JOINED = " (+LF)"  # on BEGIN when install added the file's missing final newline
END = "# <<< llmtap <<<"
BLOCK_RE = re.compile(rf"(\n?){re.escape(BEGIN)}( \(\+LF\))?\n.*?^{re.escape(END)}\n",
                      re.DOTALL | re.MULTILINE)


def exports(values: dict[str, str]) -> str:
    return "".join(f"export {name}='{value.replace(QUOTE, ESCAPED_QUOTE)}'\n"
                   for name, value in values.items())


def with_block(text: str, values: dict[str, str]) -> str:
    """`text` with our block (replaced if present, else appended)."""
    text = without_block(text)
    joined = bool(text) and not text.endswith("\n")
    block = f"{BEGIN}{JOINED if joined else ''}\n{exports(values)}{END}\n"
    return text + ("\n" if joined else "") + block


def without_block(text: str) -> str:
    """`text` exactly as it was before with_block."""
    def drop(match: re.Match[str]) -> str:
        return "" if match.group(2) else match.group(1)

    return BLOCK_RE.sub(drop, text)


def has_block(text: str) -> bool:
    return BLOCK_RE.search(text) is not None


def block_values(text: str) -> dict[str, str]:
    """The variables our block sets (what a new shell gets)."""
    found = BLOCK_RE.search(text)
    values = {}
    for line in (found.group(0) if found else "").splitlines():
        match = re.match(r"^export ([A-Z_]+)='(.*)'$", line)
        if match:
            values[match.group(1)] = match.group(2).replace(ESCAPED_QUOTE, QUOTE)
    return values


def setenv_script(values: dict[str, str]) -> str:
    return "; ".join(shlex.join([LAUNCHCTL, "setenv", name, value]) for name, value in values.items())


def render_agent(values: dict[str, str], label: str = AGENT_LABEL) -> bytes:
    """The LaunchAgent: at each GUI login, setenv in that user's domain, then exit."""
    definition = {
        "Label": label,
        "ProgramArguments": ["/bin/sh", "-c", setenv_script(values)],
        "RunAtLoad": True,
        "LimitLoadToSessionType": ["Aqua"],
    }
    return plistlib.dumps(definition, fmt=plistlib.FMT_XML, sort_keys=True)


def console_uid_command() -> list[str]:
    return ["/usr/bin/stat", "-f", "%u", "/dev/console"]


def console_uid(runner: Runner) -> int | None:
    """The user logged in at the screen (None at the login window, where it is root)."""
    result = runner(console_uid_command())
    text = result.stdout.strip()
    return int(text) if result.ok and text.isdigit() and int(text) != 0 else None


def asuser(uid: int, *argv: str) -> list[str]:
    """launchctl run in the user's GUI bootstrap (asuser) AND as the user (sudo): asuser alone
    keeps root's credentials, and launchd picks a setenv's domain by both (the idiom MDM scripts
    use for per-user launchctl calls)."""
    return [LAUNCHCTL, "asuser", str(uid), SUDO, "-u", f"#{uid}", LAUNCHCTL, *argv]


def getenv_command(uid: int, name: str) -> list[str]:
    return asuser(uid, "getenv", name)


class GuiSession:
    """The console user's launchd environment, changed now (the agent covers later logins)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def set(self, values: dict[str, str]) -> int | None:
        uid = console_uid(self.runner)
        if uid is not None:
            for name, value in values.items():
                self.runner(asuser(uid, "setenv", name, value))
        return uid

    def unset(self, names: list[str], expected: dict[str, str] | None = None) -> int | None:
        """Unsets the names still holding our values (`expected`), or all of them."""
        uid = console_uid(self.runner)
        if uid is None:
            return None
        current = self.get(uid, names)
        for name in names:
            if current.get(name) and (expected is None or current[name] == expected.get(name)):
                self.runner(asuser(uid, "unsetenv", name))
        return uid

    def get(self, uid: int, names: list[str]) -> dict[str, str]:
        values = {}
        for name in names:
            result = self.runner(getenv_command(uid, name))
            if result.ok and result.stdout.strip():
                values[name] = result.stdout.rstrip("\n")
        return values
