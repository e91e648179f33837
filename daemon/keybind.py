"""Keys bound to programs: which local processes a secret's real key may be added for.

A secret set with `--allow-exe PATH`, `--allow-script INTERPRETER:SCRIPT` or `--allow-user USER`
is *bound*: its real key goes in only for a connection whose process (as the root supervisor
describes it, llmtap.proclookup) passes every kind of rule given:

- programs (`--allow-exe`, `--allow-script`): the process's executable is one of the allowed
  real paths (what /proc/PID/exe shows: argv[0], a symlink's name or a copy elsewhere count for
  nothing), or it is an allowed interpreter whose first argument is the allowed script (both as
  real paths: `node /usr/local/bin/claude` is node running Claude Code's cli.js). With
  `--allow-children` a process in its parent chain may be the allowed one instead.
- users (`--allow-user`): the process's real user is one of them.

What cannot be told (no answer in time, a process that exited, a socket its parent holds too, a
process in another root filesystem) is "not allowed". Paths are resolved when the secret is set,
so a symlink given then is bound to its target. A script is named by the process's own
arguments, which it can rewrite: a script binding keeps other programs of the same user from the
key by mistake, not by force (processes of one user can also ptrace each other); `--allow-user`
with a user of its own is the hard line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmtap.errors import UsageError

if TYPE_CHECKING:
    from llmtap.secrets_store import Secret

MAX_RULES = 32  # per kind: a binding is a short list a person wrote


@dataclass(frozen=True)
class Binding:
    exes: frozenset[str] = frozenset()
    scripts: frozenset[tuple[str, str]] = frozenset()  # (interpreter, script), real paths
    users: frozenset[str] = frozenset()
    children: bool = False  # a parent in the chain may be the allowed program

    @property
    def bound(self) -> bool:
        return bool(self.exes or self.scripts or self.users)

    def rule(self) -> str:
        """The binding as one line, for refusals, records and `secrets list`."""
        parts = []
        programs = [*sorted(self.exes), *(f"{i} {s}" for i, s in sorted(self.scripts))]
        if programs:
            chain = " (or a parent of it)" if self.children else ""
            parts.append(f"programs {', '.join(programs)}{chain}")
        if self.users:
            parts.append(f"users {', '.join(sorted(self.users))}")
        return " and ".join(parts) or "anyone"

    def check(self, process: Mapping[str, Any] | None) -> str | None:
        """None when the process may have the key, else why not (naming what connected)."""
        if not self.bound:
            return None
        if not isinstance(process, Mapping) or not process.get("pid"):
            return "the process that connected could not be determined in time"
        who = describe(process)
        if process.get("shared"):
            return f"the connection is shared with its parent process ({who})"
        if process.get("held_elsewhere"):
            return (f"another program (pid {process['held_elsewhere']}) holds the connection "
                    f"too ({who})")
        if process.get("foreign_root"):
            return f"it came from a process in another root filesystem, a container ({who})"
        if self.users and process.get("user") not in self.users:
            return f"it came from {who}"
        if (self.exes or self.scripts) and not any(self._program(p) for p in self._chain(process)):
            return f"it came from {who}"
        return None

    def _chain(self, process: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        parents = process.get("parents") if self.children else None
        return [process, *(p for p in parents if isinstance(p, Mapping))] if isinstance(parents, list) \
            else [process]

    def _program(self, process: Mapping[str, Any]) -> bool:
        exe, script = process.get("exe"), process.get("script")
        return isinstance(exe, str) and (exe in self.exes or (exe, script) in self.scripts)


UNBOUND = Binding()


def describe(process: Mapping[str, Any]) -> str:
    """What connected, as a refusal names it: executable, script, pid, user."""
    exe = process.get("exe") or process.get("name") or "an unknown program"
    script = f" {process['script']}" if process.get("script") else ""
    return f"{exe}{script} (pid {process.get('pid')}, user {process.get('user') or '?'})"


def of_secret(secret: Secret) -> Binding:
    """The binding a stored secret carries (unbound when it names no program or user)."""
    pairs = (tuple(pair) for pair in secret.allow_scripts)
    return Binding(frozenset(secret.allow_exes), frozenset((p[0], p[1]) for p in pairs if len(p) == 2),
                   frozenset(secret.allow_users), secret.allow_children)


# --- checks of what `llmtap secrets set` is given (each failure is one line naming the flag) ---


def _real_file(path: str, flag: str, executable: bool) -> str:
    real = os.path.realpath(os.path.expanduser(path))
    if not os.path.exists(real):
        raise UsageError(f"{flag} {path!r}: no such file")
    if not os.path.isfile(real):
        raise UsageError(f"{flag} {path!r}: not a file ({real})")
    if executable and not os.access(real, os.X_OK):
        raise UsageError(f"{flag} {path!r}: not executable ({real})")
    return real


def check_exes(paths: list[str]) -> tuple[str, ...]:
    """The executables' real paths (a symlink is bound to its target, as /proc/PID/exe shows)."""
    if len(paths) > MAX_RULES:
        raise UsageError(f"--allow-exe: at most {MAX_RULES}")
    return tuple(dict.fromkeys(_real_file(p, "--allow-exe", True) for p in paths))


def check_scripts(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """`--allow-script INTERPRETER:SCRIPT`: the two real paths (split at the first colon)."""
    if len(specs) > MAX_RULES:
        raise UsageError(f"--allow-script: at most {MAX_RULES}")
    found = []
    for spec in specs:
        interpreter, sep, script = spec.partition(":")
        if not (sep and interpreter and script):
            raise UsageError(f"--allow-script {spec!r}: write INTERPRETER:SCRIPT, e.g. "
                             "/usr/bin/node:/usr/lib/node_modules/@anthropic-ai/claude-code/cli.js")
        found.append((_real_file(interpreter, "--allow-script", True),
                      _real_file(script, "--allow-script", False)))
    return tuple(dict.fromkeys(found))


def check_users(users: list[str]) -> tuple[str, ...]:
    """Local user names (a uid is taken as its user's name)."""
    import pwd  # POSIX only: bindings are not offered where there is no pwd

    names = []
    for user in (u.strip() for u in users):
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, OverflowError):
            raise UsageError(f"--allow-user {user!r}: no such user") from None
        names.append(entry.pw_name)
    if len(names) > MAX_RULES:
        raise UsageError(f"--allow-user: at most {MAX_RULES}")
    return tuple(dict.fromkeys(names))
