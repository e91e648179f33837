"""macOS service account: a hidden `_name` user and group in the local directory, with `dscl`.

Apple's own daemon accounts (`_www`, `_mysql`) have two record names, `_www` and `www`, a UID and
GID below 500 (so the login window and System Settings do not list them), no shell, no home, no
password, and IsHidden. llmtap's is made the same way, so `pwd.getpwnam("llmtap")` (how the daemon
finds the user it drops to) answers on macOS as on Linux. The id is the highest one below 500
that is free as both a UID and a GID, read from `dscl . -list`: Apple adds its accounts from the
bottom of that range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmtap.errors import RuntimeFailure
from llmtap.platform.runner import Runner

DSCL = "/usr/bin/dscl"
FIRST_ID, LAST_ID = 200, 499  # below 500: a system account
REAL_NAME = "llmtap daemon"


@dataclass(frozen=True)
class Account:
    name: str  # the record name, `_llmtap`
    alias: str  # the second record name, `llmtap` (config.service_user)

    @property
    def user(self) -> str:
        return f"/Users/{self.name}"

    @property
    def group(self) -> str:
        return f"/Groups/{self.name}"


def account_for(service_user: str) -> Account:
    name = service_user if service_user.startswith("_") else f"_{service_user}"
    return Account(name, service_user.lstrip("_") or service_user)


def parse_ids(output: str) -> dict[str, int]:
    """`dscl . -list /Users UniqueID` (or /Groups PrimaryGroupID): name and id per line."""
    ids = {}
    for line in output.splitlines():
        match = re.match(r"^(\S+)\s+(-?\d+)\s*$", line)
        if match:
            ids[match.group(1)] = int(match.group(2))
    return ids


def free_id(uids: set[int], gids: set[int]) -> int:
    for candidate in range(LAST_ID, FIRST_ID - 1, -1):
        if candidate not in uids and candidate not in gids:
            return candidate
    raise RuntimeFailure(f"no id between {FIRST_ID} and {LAST_ID} is free as a UID and a GID")


def list_command(kind: str) -> list[str]:
    return [DSCL, ".", "-list", f"/{kind}", "UniqueID" if kind == "Users" else "PrimaryGroupID"]


def read_command(record: str, attribute: str) -> list[str]:
    return [DSCL, ".", "-read", record, attribute]


def parse_read(output: str) -> str | None:
    """`UniqueID: 499` -> `499`."""
    match = re.match(r"^\s*\S+:\s*(\S.*?)\s*$", output.strip().splitlines()[0] if output.strip()
                     else "")
    return match.group(1) if match else None


def create_commands(account: Account, ident: int, group_exists: bool) -> list[list[str]]:
    """The group first (the user names it as its primary group), each attribute one command."""
    commands = []
    if not group_exists:
        commands += [[DSCL, ".", "-create", account.group],
                     [DSCL, ".", "-create", account.group, "PrimaryGroupID", str(ident)],
                     [DSCL, ".", "-create", account.group, "RecordName", account.name, account.alias],
                     [DSCL, ".", "-create", account.group, "RealName", REAL_NAME],
                     [DSCL, ".", "-create", account.group, "Password", "*"]]
    user = account.user
    return [
        *commands,
        [DSCL, ".", "-create", user],
        [DSCL, ".", "-create", user, "UniqueID", str(ident)],
        [DSCL, ".", "-create", user, "PrimaryGroupID", str(ident)],
        [DSCL, ".", "-create", user, "RecordName", account.name, account.alias],
        [DSCL, ".", "-create", user, "RealName", REAL_NAME],
        [DSCL, ".", "-create", user, "UserShell", "/usr/bin/false"],
        [DSCL, ".", "-create", user, "NFSHomeDirectory", "/var/empty"],
        [DSCL, ".", "-create", user, "Password", "*"],
        [DSCL, ".", "-create", user, "IsHidden", "1"],
    ]


def delete_command(record: str) -> list[str]:
    return [DSCL, ".", "-delete", record]


class Directory:
    """The local directory node, through dscl."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def ids(self, kind: str) -> dict[str, int]:
        result = self.runner(list_command(kind))
        if not result.ok:
            raise RuntimeFailure(f"dscl could not list {kind.lower()}: {result.reason()}")
        return parse_ids(result.stdout)

    def read_id(self, record: str) -> int | None:
        attribute = "UniqueID" if record.startswith("/Users/") else "PrimaryGroupID"
        result = self.runner(read_command(record, attribute))
        value = parse_read(result.stdout) if result.ok else None
        return int(value) if value and value.lstrip("-").isdigit() else None

    def lookup(self, account: Account) -> tuple[int, int] | None:
        """(uid, gid) of the account, None when there is no such user."""
        uid = self.read_id(account.user)
        if uid is None:
            return None
        result = self.runner(read_command(account.user, "PrimaryGroupID"))
        gid = parse_read(result.stdout) if result.ok else None
        return uid, int(gid) if gid and gid.isdigit() else uid

    def create(self, account: Account) -> int:
        group_id = self.read_id(account.group)
        ident = group_id if group_id is not None and group_id not in self.ids("Users").values() \
            else free_id(set(self.ids("Users").values()), set(self.ids("Groups").values()))
        for command in create_commands(account, ident, group_id is not None):
            self.run(command)
        return ident

    def delete(self, record: str) -> bool:
        if self.read_id(record) is None:
            return False
        self.run(delete_command(record))
        return True

    def run(self, command: list[str]) -> None:
        result = self.runner(command)
        if not result.ok:
            raise RuntimeFailure(f"dscl {' '.join(command[2:4])} failed: {result.reason()}")
