"""The service user and the privilege drop of the proxy worker."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.linux.users import create_system_user
from llmtap.platform.runner import SubprocessRunner
from llmtap.platform.windows.elevation import require_elevated

with contextlib.suppress(ImportError):  # Windows has neither (and no service user there)
    import grp
    import pwd


@dataclass(frozen=True)
class ServiceUser:
    name: str
    uid: int
    gid: int


def require_root(action: str) -> None:
    if not hasattr(os, "geteuid"):  # Windows: root is an elevated (Administrator) process
        require_elevated(action)
        return
    if os.geteuid() != 0:
        raise UsageError(f"{action} needs root: run it with sudo")


def ensure_service_user(name: str) -> ServiceUser:
    """The system user and group `name`, created if missing (no home, no login shell)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        create_system_user(name, SubprocessRunner())
        entry = pwd.getpwnam(name)
    return ServiceUser(name, entry.pw_uid, entry.pw_gid)


def drop_privileges(user: ServiceUser) -> None:
    """Becomes `user` for good: no supplementary groups, no way back to root."""
    os.setgroups([])
    os.setgid(user.gid)
    os.setuid(user.uid)
    if os.geteuid() == 0 or os.getegid() == 0:
        raise RuntimeFailure("privilege drop failed: still root")


def is_member(uid: int, group: str) -> bool:
    """Whether the user with `uid` is root or in `group` (primary or supplementary)."""
    if uid == 0:
        return True
    try:
        group_entry = grp.getgrnam(group)
        user_entry = pwd.getpwuid(uid)
    except KeyError:
        return False
    return user_entry.pw_gid == group_entry.gr_gid or user_entry.pw_name in group_entry.gr_mem
