"""The secret store: real API keys at rest under `state_dir/secrets/`, written by root only.

    state_dir/secrets/          0750, root and the service user's group (the worker reads it)
        secrets.json            0640: names, hosts, placeholders, sealed values or references
        store.key               0640: the AES-GCM key that seals the values in secrets.json
        .lock                   serialises the CLI's read-modify-write
    state_dir/secrets-usage.json  last-used times, written by the worker (never by root)

Values are sealed so that the plain key is in no file (a grep of the state dir, a backup of
secrets.json alone or a pasted bug report does not reveal it); anyone who can read both files can
unseal them, so the real protection is the ownership and modes, which are checked on every read.
A value may instead be a reference (`env:VAR`, `file:PATH`, `keyring:SERVICE/USER`) that the
daemon resolves when it starts (llmtap.secret_references). Which header and variables each
provider uses, and the placeholders' shapes, are in llmtap.provider_keys.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from llmtap import hostpatterns
from llmtap.atomic import write_atomic
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.provider_keys import DEFAULT_HEADERS, make_placeholder, provider_host

with contextlib.suppress(ImportError):  # POSIX
    import fcntl
with contextlib.suppress(ImportError):  # Windows
    import msvcrt

# Windows has no uids or mode bits: there the store is guarded by its directory's ACL
# (Administrators and SYSTEM only, llmtap.platform.windows.acl), not by owner and mode checks.
POSIX_OWNERS = hasattr(os, "geteuid")
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # Windows opens no symbolic link it was not asked to

SECRETS_DIR = "secrets"
HEADERS = ("x-api-key", "authorization", "api-key", "x-goog-api-key", "query:key")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REF_RE = re.compile(r"^(env|file|keyring):")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Keys are single tokens: anything else would corrupt a header or a query string.
VALUE_RE = re.compile(r"^[\x21-\x7e]+$")

@dataclass(frozen=True)
class Secret:
    name: str
    id: str  # random; keys the usage file, so a re-created name starts as "never used"
    hosts: tuple[str, ...]
    header: str  # where the key goes when llmtap adds it (`when_absent`)
    when_absent: bool
    placeholder: str
    created_at: str
    updated_at: str
    sealed: str | None = None  # base64(nonce + AES-GCM ciphertext) of a literal value
    ref: str | None = None  # env:VAR | file:PATH | keyring:SERVICE/USER, resolved at start
    for_users: tuple[str, ...] = ()  # when_absent: the local users whose requests get the key
    # Bound to programs (llmtap.keybind): real paths, (interpreter, script) pairs, user names.
    allow_exes: tuple[str, ...] = ()
    allow_scripts: tuple[tuple[str, str], ...] = ()
    allow_users: tuple[str, ...] = ()
    allow_children: bool = False

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Secret:
        return cls(**{**raw, "hosts": tuple(raw["hosts"]), "for_users": tuple(raw.get("for_users", ())),
                      "allow_exes": tuple(raw.get("allow_exes", ())),
                      "allow_scripts": tuple((str(i), str(s)) for i, s in raw.get("allow_scripts", ())),
                      "allow_users": tuple(raw.get("allow_users", ()))})


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- input checks (each failure is one line naming the flag) ---


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UsageError(f"secret name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return name


def check_hosts(hosts: list[str]) -> tuple[str, ...]:
    cleaned = tuple(dict.fromkeys(h.strip().lower().rstrip(".") for h in hosts))
    for host in cleaned:  # a name, or a pattern (*.openai.azure.com): see llmtap.hostpatterns
        try:
            hostpatterns.parse(host)
        except ValueError as exc:
            reason = "is not a host name" if "*" not in host else str(exc)
            raise UsageError(f"--host {host!r} {reason}") from None
    return cleaned


def check_header(header: str | None, hosts: tuple[str, ...]) -> str:
    if header is None:
        return DEFAULT_HEADERS.get(provider_host(hosts[0]), "authorization") if hosts else "authorization"
    if header.lower() not in HEADERS:
        raise UsageError(f"--header must be one of {', '.join(HEADERS)}, not {header!r}")
    return header.lower()


def check_for_users(users: list[str], when_absent: bool) -> tuple[str, ...]:
    """--when-absent adds a key to requests that carry none, from whoever sends them: on a shared
    machine that must be scoped to the local users it serves."""
    cleaned = tuple(dict.fromkeys(u.strip() for u in users if u.strip()))
    if when_absent and not cleaned:
        raise UsageError("--when-absent needs --for-user USER (repeatable): the local users whose "
                         "requests get the key added")
    if cleaned and not when_absent:
        raise UsageError("--for-user goes with --when-absent")
    for user in cleaned:
        if not NAME_RE.match(user):
            raise UsageError(f"--for-user {user!r} is not a user name")
    return cleaned


def check_value(value: str) -> str:
    value = value.strip()
    if not value:
        raise UsageError("empty value: pipe the key on stdin or type it at the prompt")
    if not VALUE_RE.match(value):
        raise UsageError("the value must be one token of printable ASCII (no spaces or newlines)")
    return value


def check_reference(ref: str) -> str:
    kind, _, rest = ref.partition(":")
    if kind == "env" and ENV_NAME_RE.match(rest):
        return ref
    if kind == "file" and rest.startswith("/"):
        return ref
    if kind == "keyring" and keyring_parts(ref) is not None:
        return ref
    raise UsageError(f"bad reference {ref!r}: use env:VAR, file:/absolute/path or keyring:SERVICE/USER")


def keyring_parts(ref: str) -> tuple[str, str] | None:
    service, _, user = ref.removeprefix("keyring:").rpartition("/")
    return (service, user) if service and user else None


def is_reference(value: str) -> bool:
    return bool(REF_RE.match(value))


# --- files, ownership and modes ---


@dataclass(frozen=True)
class StorePaths:
    directory: Path

    @classmethod
    def under(cls, state_dir: Path) -> StorePaths:
        return cls(Path(state_dir) / SECRETS_DIR)

    @property
    def store(self) -> Path:
        return self.directory / "secrets.json"

    @property
    def key(self) -> Path:
        return self.directory / "store.key"

    @property
    def usage(self) -> Path:  # beside the store: the worker cannot write in its directory
        return self.directory.parent / "secrets-usage.json"

    @property
    def lock(self) -> Path:
        return self.directory / ".lock"


def check_own_store(paths: StorePaths) -> None:
    """check_permissions for the process that reads the store (the daemon, on any platform)."""
    if not POSIX_OWNERS:
        check_permissions(paths, -1, "")
        return
    import pwd

    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = str(os.getuid())
    check_permissions(paths, os.getuid(), name)


FILE_MODE, DIR_MODE = 0o640, 0o750
GROUP_OTHER_WRITE_OR_OTHER = 0o027  # no bit of these may be set on the store or its directory


def check_permissions(paths: StorePaths, service_uid: int, service_name: str) -> None:
    """Refuses (exit 2) a store that anyone but root and the service user could read, or anyone
    but its owner could write, naming the fix. The owner is root (what `sudo llmtap secrets`
    writes) or the service user itself. On Windows only links are refused: the directory's ACL
    is the guard (ensure_directory)."""
    for path, mode in ((paths.directory, DIR_MODE), (paths.store, FILE_MODE), (paths.key, FILE_MODE)):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        except PermissionError:
            raise UsageError(f"cannot read the secret store in {paths.directory}: run it with sudo") from None
        if stat.S_ISLNK(info.st_mode):
            raise UsageError(f"{path} is a symbolic link: the secret store must be a plain file")
        if not POSIX_OWNERS:
            continue
        wrong = []
        if info.st_uid not in (0, service_uid):
            wrong.append(f"owned by uid {info.st_uid}")
        if stat.S_IMODE(info.st_mode) & GROUP_OTHER_WRITE_OR_OTHER:
            wrong.append(f"mode {stat.S_IMODE(info.st_mode):04o}")
        if wrong:
            raise UsageError(
                f"refusing the secret store: {path} is {' and '.join(wrong)} (must be root's, group "
                f"{service_name}, {mode:04o}); fix: sudo chown root:{service_name} {path} && "
                f"sudo chmod {mode:o} {path}"
            )


def ensure_directory(paths: StorePaths, uid: int, gid: int,
                     restrict: Callable[[Path], None] | None = None) -> None:
    """POSIX: the state dir for the service user (uid:gid, 0700); the store's directory for its
    writer (root) and the service user's group, 0750. Windows: Administrators and SYSTEM only."""
    if not POSIX_OWNERS:
        from llmtap.platform.windows.acl import restrict_to_administrators

        paths.directory.mkdir(parents=True, exist_ok=True)
        (restrict or restrict_to_administrators)(paths.directory)
        return
    state_dir = paths.directory.parent
    if not state_dir.exists():
        state_dir.mkdir(mode=0o700, parents=True)
        os.chown(state_dir, uid, gid)
    if not paths.directory.exists():
        paths.directory.mkdir(mode=DIR_MODE)
        os.chown(paths.directory, -1, gid)


@contextlib.contextmanager
def locked(paths: StorePaths) -> Iterator[None]:
    """Serialises the CLI's read-modify-write of the store (the worker only reads)."""
    try:
        fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600)  # the writer's own
    except PermissionError:
        raise UsageError(f"cannot write the secret store in {paths.directory}: run it with sudo") from None
    try:
        if not POSIX_OWNERS:
            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # type: ignore[attr-defined]  # Windows only
        else:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if not POSIX_OWNERS:
            with contextlib.suppress(OSError):  # closing may release it only later on Windows
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
        os.close(fd)


def write_private(path: Path, data: bytes, uid: int, gid: int, durable: bool = True,
                  mode: int = 0o600) -> None:
    """Atomically replaces `path` with a file of `mode` owned by uid:gid (-1: unchanged; synced
    if `durable`)."""
    write_atomic(path, data, mode, None if (uid, gid) == (-1, -1) else (uid, gid), durable)


def read_store(paths: StorePaths) -> list[Secret]:
    try:
        return _parse(paths, paths.store.read_bytes())
    except FileNotFoundError:
        return []
    except PermissionError:
        raise UsageError(f"cannot read the secret store in {paths.directory}: run it with sudo") from None


def _parse(paths: StorePaths, data: bytes) -> list[Secret]:
    try:
        raw = json.loads(data.decode("utf-8"))
        return [Secret.from_json(item) for item in raw["secrets"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeFailure(f"secret store {paths.store} is damaged ({type(exc).__name__})") from None


def read_root_only_store(paths: StorePaths) -> list[Secret] | None:
    """The store as root reads it to resolve references, or None when anyone but root could have
    written it: its directory and file are opened without following links and checked on the open
    descriptors, so nothing can be swapped in between the check and the read."""
    try:
        dir_fd = os.open(paths.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | NOFOLLOW)
    except FileNotFoundError:
        return []
    try:
        if not _root_only(os.fstat(dir_fd)):
            return None
        try:
            fd = os.open(paths.store.name, os.O_RDONLY | NOFOLLOW, dir_fd=dir_fd)
        except FileNotFoundError:
            return []
        with os.fdopen(fd, "rb") as file:
            return _parse(paths, file.read()) if _root_only(os.fstat(file.fileno())) else None
    finally:
        os.close(dir_fd)


def _root_only(info: os.stat_result) -> bool:
    return info.st_uid == 0 and not stat.S_IMODE(info.st_mode) & 0o022


def write_store(paths: StorePaths, items: list[Secret], gid: int) -> None:
    """Written by its writer (root), readable by the service user's group."""
    document = {"version": 1, "secrets": [asdict(s) for s in items]}
    write_private(paths.store, (json.dumps(document, indent=2) + "\n").encode(), -1, gid,
                  mode=FILE_MODE)


# --- sealing ---


def read_key(paths: StorePaths) -> bytes | None:
    try:
        key = base64.b64decode(paths.key.read_bytes().strip(), validate=True)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise UsageError(f"cannot read the secret store in {paths.directory}: run it with sudo") from None
    except ValueError:
        raise RuntimeFailure(f"{paths.key} is damaged") from None
    if len(key) != 32:
        raise RuntimeFailure(f"{paths.key} is damaged")
    return key


def ensure_key(paths: StorePaths, gid: int) -> bytes:
    key = read_key(paths)
    if key is None:
        key = AESGCM.generate_key(bit_length=256)
        write_private(paths.key, base64.b64encode(key) + b"\n", -1, gid, mode=FILE_MODE)
    return key


def seal(key: bytes, secret_id: str, value: str) -> str:
    nonce = secrets.token_bytes(12)
    return base64.b64encode(nonce + AESGCM(key).encrypt(nonce, value.encode(), secret_id.encode())).decode()


def unseal(key: bytes, secret_id: str, sealed: str) -> str:
    try:
        blob = base64.b64decode(sealed)
        return AESGCM(key).decrypt(blob[:12], blob[12:], secret_id.encode()).decode()
    except (InvalidTag, ValueError):
        raise RuntimeFailure("cannot unseal: store.key does not match secrets.json") from None


def new_secret(name: str, hosts: tuple[str, ...], header: str, when_absent: bool,
               value: str, key: bytes, previous: Secret | None = None,
               for_users: tuple[str, ...] = ()) -> Secret:
    """A secret for `value` (a key or a reference); a replaced one keeps its placeholder and id."""
    stamp = now()
    secret_id = previous.id if previous else secrets.token_hex(8)
    ref = value if is_reference(value) else None
    return Secret(
        name=name,
        id=secret_id,
        hosts=hosts,
        header=header,
        when_absent=when_absent,
        placeholder=previous.placeholder if previous else make_placeholder(hosts, None if ref else value),
        created_at=previous.created_at if previous else stamp,
        updated_at=stamp,
        sealed=None if ref else seal(key, secret_id, value),
        ref=ref,
        for_users=for_users if when_absent else (),
    )


def read_usage(paths: StorePaths) -> dict[str, str]:
    """Last-used times by secret id (written by the worker; missing or damaged: none)."""
    try:
        usage = json.loads(paths.usage.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in usage.items()} if isinstance(usage, dict) else {}
