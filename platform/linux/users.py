"""The service user on Linux: looked up (in /etc/passwd under a root, for tests) and created with
useradd, through the runner."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from llmtap.errors import RuntimeFailure
from llmtap.platform.linux.trust import Which
from llmtap.platform.runner import Runner

with contextlib.suppress(ImportError):  # not on Windows (the NO_POSIX import test)
    import grp
    import pwd


def lookup_user(root: Path, name: str) -> tuple[int, int] | None:
    """(uid, gid) of the user `name` on the system under `root`."""
    if root == Path("/"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        return entry.pw_uid, entry.pw_gid
    for line in _lines(root / "etc/passwd"):
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == name:
            return int(fields[2]), int(fields[3])
    return None


def group_exists(root: Path, name: str) -> bool:
    if root == Path("/"):
        try:
            grp.getgrnam(name)
        except KeyError:
            return False
        return True
    return any(line.split(":")[0] == name for line in _lines(root / "etc/group"))


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def prefix(root: Path) -> list[str]:
    """useradd/userdel/groupdel's option to work on the system under `root`."""
    return [] if root == Path("/") else ["--prefix", str(root)]


def useradd_command(root: Path, name: str, group_present: bool) -> list[str]:
    """A system user with no home and no login shell, in its own group."""
    group = ["--gid", name] if group_present else ["--user-group"]
    return ["useradd", *prefix(root), "--system", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", *group, name]


def create_system_user(name: str, runner: Runner, which: Which = shutil.which) -> None:
    """useradd on this machine; the failure names useradd's own last complaint."""
    if not which("useradd"):
        raise RuntimeFailure(f"user {name!r} does not exist and useradd is missing: create it by hand")
    result = runner(useradd_command(Path("/"), name, group_exists(Path("/"), name)))
    if not result.ok:
        reason = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise RuntimeFailure(f"cannot create system user {name!r}: {reason}")
