"""Secret references (`env:VAR`, `file:PATH`, `keyring:SERVICE/USER`), resolved at daemon start.

Root resolves them in the supervisor, before the worker drops its privileges, and only from a
store that nobody but root can write: a store the service user could write would let it make
root read any file and inject it (resolve_at_start).
"""

from __future__ import annotations

import os
from pathlib import Path

from llmtap import secrets_store as store
from llmtap.secrets_store import DIR_MODE, FILE_MODE, VALUE_RE, StorePaths, keyring_parts


class ResolutionError(Exception):
    """Why a reference gave no value. The message never contains a secret."""


# Filled by the root supervisor before it forks the worker, which inherits it: the worker can
# neither read root-only files nor reach root's keyring once it has dropped its privileges.
_AT_START: dict[str, str | ResolutionError] = {}


def resolve(ref: str, keyring_allowed: bool = False) -> str:
    """The value a reference points to, in this process's environment (the daemon's)."""
    if ref in _AT_START:
        cached = _AT_START[ref]
        if isinstance(cached, ResolutionError):
            raise cached
        return cached
    kind, _, rest = ref.partition(":")
    if kind == "env":
        value = os.environ.get(rest)
        if value is None:
            raise ResolutionError("not set in the daemon's environment")
    elif kind == "file":
        try:
            value = Path(rest).read_text(encoding="utf-8")
        except OSError as exc:
            raise ResolutionError(f"cannot read {rest}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ResolutionError(f"{rest} is not text") from None
    elif kind == "keyring":
        if not keyring_allowed:
            raise ResolutionError("keyring references are resolved at start: restart the daemon")
        value = _from_keyring(ref)
    else:
        raise ResolutionError("not a reference")
    value = value.strip()
    if not value or not VALUE_RE.match(value):
        raise ResolutionError("the value it gives is empty or not one token")
    return value


def _from_keyring(ref: str) -> str:
    # Imported here: only the root supervisor resolves keyring references (before the fork, so
    # the worker never needs it) and the CLI should not pay for the import.
    import keyring
    import keyring.errors

    service, user = keyring_parts(ref) or ("", "")
    try:
        value = keyring.get_password(service, user)
    except keyring.errors.KeyringError as exc:
        raise ResolutionError(f"keyring error: {type(exc).__name__}: {exc}") from None
    if value is None:
        raise ResolutionError(f"no password for service {service!r}, user {user!r} in the keyring")
    return value


def resolve_at_start(state_dir: Path, owner_uid: int, owner_name: str) -> None:
    """In the supervisor, as root, before the fork: checks the store and resolves its references.

    Failures are kept and reported by the worker, which answers that secret's placeholder with an
    error; a store with wrong ownership or modes stops the daemon (exit 2, with the fix). Only a
    store that root alone can write is trusted with root's rights: in any other (the service user
    wrote it, or could have), no reference is resolved at all, and each says why.
    """
    paths = StorePaths.under(state_dir)
    store.check_permissions(paths, owner_uid, owner_name)
    trusted = store.read_root_only_store(paths) if store.POSIX_OWNERS else store.read_store(paths)
    if trusted is None:
        untrusted = ResolutionError(
            f"not resolved with root's rights: {paths.store} can be written by someone other than "
            f"root; fix: sudo chown root:{owner_name} {paths.directory} {paths.store} && sudo chmod "
            f"{DIR_MODE:o} {paths.directory} && sudo chmod {FILE_MODE:o} {paths.store}")
        for item in store.read_store(paths):
            if item.ref:
                _AT_START[item.ref] = untrusted
        return
    for item in trusted:
        if item.ref and item.ref not in _AT_START:
            try:
                _AT_START[item.ref] = resolve(item.ref, keyring_allowed=True)
            except ResolutionError as exc:
                _AT_START[item.ref] = exc
