"""Windows: llmtap's directories open to Administrators and SYSTEM only (Linux: 0700, owned by the
service user). A directory made under C:\\ or %ProgramData% inherits read access for every user,
and Authenticated Users may even modify what is under C:\\: that must never reach the CA key."""

from __future__ import annotations

from pathlib import Path

from llmtap.errors import RuntimeFailure
from llmtap.platform.runner import Runner, SubprocessRunner

ICACLS = "icacls"
# SIDs, not names: the names are translated in localized Windows.
SYSTEM_SID = "S-1-5-18"
ADMINISTRATORS_SID = "S-1-5-32-544"


def restrict_command(directory: Path) -> list[str]:
    """/inheritance:r drops what the directory inherited; /grant:r with (OI)(CI) leaves exactly
    these two entries, which every file and folder made inside then inherits."""
    return [ICACLS, str(directory), "/inheritance:r", "/grant:r",
            f"*{SYSTEM_SID}:(OI)(CI)F", f"*{ADMINISTRATORS_SID}:(OI)(CI)F"]


def restrict_to_administrators(directory: Path, runner: Runner | None = None) -> None:
    result = (runner or SubprocessRunner())(restrict_command(directory))
    if not result.ok:
        raise RuntimeFailure(f"cannot restrict {directory} to Administrators (icacls): {result.reason()}")


USERS_SID = "S-1-5-32-545"


def owner_command(directory: Path) -> list[str]:
    """Administrators own the directory and all in it: one that another user made first (every
    user may create folders in %ProgramData%) keeps no owner's rights for them."""
    return [ICACLS, str(directory), "/setowner", f"*{ADMINISTRATORS_SID}", "/T", "/C", "/Q"]


def readable_command(directory: Path) -> list[str]:
    """Every local user may read it (the public CA certificate and bundle), nobody else write."""
    return [ICACLS, str(directory), "/grant", f"*{USERS_SID}:(OI)(CI)RX"]


def take_ownership(directory: Path, runner: Runner | None = None) -> None:
    _run(owner_command(directory), f"cannot make Administrators own {directory}", runner)


def open_for_reading(directory: Path, runner: Runner | None = None) -> None:
    _run(readable_command(directory), f"cannot let users read {directory}", runner)


def _run(argv: list[str], failure: str, runner: Runner | None) -> None:
    result = (runner or SubprocessRunner())(argv)
    if not result.ok:
        raise RuntimeFailure(f"{failure} (icacls): {result.reason()}")
