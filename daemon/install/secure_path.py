"""Is what a root service runs writable by anyone but root?

A LaunchDaemon or a systemd unit runs its program as root at every boot. If that program, its interpreter, the
llmtap package or any directory above them is writable by a user (a Homebrew prefix, a
`pip install --user`, a venv in a home directory), any process of that user (a malicious package
an agent installs) can replace it and be root at the next start: it would then read every real
key. So install refuses such a path, as sudo and launchd refuse unsafe files of their own.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

import llmtap
from llmtap.errors import UsageError
from llmtap.platform.linux.systemd import interpreter_of


def problem(path: Path) -> str | None:
    """Why `path` or a directory above it is unsafe, or None: as written (a symlink in a user's
    directory can be swapped, whatever it points to) and resolved."""
    written = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    for item in (real, *real.parents, *written.parents):
        try:
            st = item.stat()
        except OSError as exc:
            return f"{item}: {exc.strerror}"
        sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX  # /tmp: no one else's
        if st.st_uid != 0:
            return f"{item} is owned by uid {st.st_uid}, not root"
        if st.st_mode & stat.S_IWOTH and not sticky:
            return f"{item} is writable by every user"
        if st.st_mode & stat.S_IWGRP and st.st_gid != 0 and not sticky:
            return f"{item} is writable by group {st.st_gid}"
    return None


def unsafe(paths: Iterable[Path]) -> list[str]:
    return [found for path in paths if (found := problem(path))]


def service_files(command: Path) -> list[Path]:
    """What the service runs as root: the command, its interpreter, llmtap's code."""
    files = [command, Path(llmtap.__file__).parent]
    if interpreter := interpreter_of(command):
        files.append(interpreter)
    return files


def check_service_command(command: Path) -> None:
    """Refuses, before any change, a service command that is missing or that a user could replace."""
    if not (command.is_file() and os.access(command, os.X_OK)):
        raise UsageError(f"the llmtap command {command} is not an executable file: set install.command")
    if problems := unsafe(service_files(command)):
        raise UsageError(f"the service would run as root what a user can change: {problems[0]}. Install "
                         "llmtap where only root can write (e.g. `sudo python3 -m venv /opt/llmtap` and set "
                         "install.command)")
