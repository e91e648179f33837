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
daemon resolves when it starts, in the root supervisor, before the worker drops its privileges.
Root resolves references only from a store that nobody but root can write: a store the service
user could write would let it make root read any file and inject it (resolve_at_start).
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
import string
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from llmtap import hostpatterns
from llmtap.atomic import write_atomic
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.parsers.classify import host_provider

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

# Where each provider's tools expect their key, and which variables they read it from.
DEFAULT_HEADERS = {
    "api.anthropic.com": "x-api-key",
    "generativelanguage.googleapis.com": "x-goog-api-key",
    "*.openai.azure.com": "api-key",
    "*.cognitiveservices.azure.com": "api-key",
    "*.services.ai.azure.com": "api-key",
}
ENV_VARS = {
    "api.anthropic.com": ("ANTHROPIC_API_KEY",),
    "api.openai.com": ("OPENAI_API_KEY", "CODEX_API_KEY"),
    "generativelanguage.googleapis.com": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "api.mistral.ai": ("MISTRAL_API_KEY",),
    "api.x.ai": ("XAI_API_KEY",),
    "api.deepseek.com": ("DEEPSEEK_API_KEY",),
    "api.groq.com": ("GROQ_API_KEY",),
    "openrouter.ai": ("OPENROUTER_API_KEY",),
    "*.openai.azure.com": ("AZURE_OPENAI_API_KEY",),
    "*.cognitiveservices.azure.com": ("AZURE_OPENAI_API_KEY",),
    "*.services.ai.azure.com": ("AZURE_OPENAI_API_KEY",),
}


def env_vars(host: str) -> tuple[str, ...]:
    """The variables the tools for `host` read its key from. AWS Bedrock's regional runtime hosts
    take an API key as a bearer token (boto3 and AnthropicBedrock read this variable)."""
    sample = next(iter(hostpatterns.parse(host).names), host)  # a region pattern: its first name
    if host_provider(sample) == "bedrock":
        return ("AWS_BEARER_TOKEN_BEDROCK",)
    return ENV_VARS.get(provider_host(host), ())


def provider_host(host: str) -> str:
    """The key of DEFAULT_HEADERS and ENV_VARS for `host`: itself, or the wildcard it is under
    (an Azure resource `myres.openai.azure.com` is `*.openai.azure.com`)."""
    wildcards = (w for w in ENV_VARS if w.startswith("*."))
    return next((w for w in wildcards if hostpatterns.parse(w).matches(host)), host)


_URLSAFE = string.ascii_letters + string.digits + "-_"
_ALNUM = string.ascii_letters + string.digits
_HEX = "0123456789abcdef"


def _random(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


# Placeholders have the shape of the provider's real keys (client-side format checks pass) and
# at least 190 random bits, so nobody can guess one that llmtap would fill in.
_FORMATS = {
    "anthropic": lambda: "sk-ant-api03-" + _random(_URLSAFE, 93) + "AA",
    "openai": lambda: "sk-proj-" + _random(_URLSAFE, 74) + "T3BlbkFJ" + _random(_URLSAFE, 74),
    "google": lambda: "AIza" + _random(_URLSAFE, 35),
    "mistral": lambda: _random(_ALNUM, 32),
    "xai": lambda: "xai-" + _random(_ALNUM, 80),
    "deepseek": lambda: "sk-" + _random(_HEX, 48),
    "groq": lambda: "gsk_" + _random(_ALNUM, 52),
    "openrouter": lambda: "sk-or-v1-" + _random(_HEX, 64),
    "bedrock": lambda: "ABSK" + _random(_ALNUM, 128),  # a long-term Bedrock API key's prefix
    "generic": lambda: "sk-" + _random(_ALNUM, 48),
}
_FORMAT_BY_HOST = {
    "api.anthropic.com": "anthropic",
    "api.openai.com": "openai",
    "generativelanguage.googleapis.com": "google",
    "api.mistral.ai": "mistral",
    "api.x.ai": "xai",
    "api.deepseek.com": "deepseek",
    "api.groq.com": "groq",
    "openrouter.ai": "openrouter",
}
_FORMAT_BY_PREFIX = (("sk-ant-", "anthropic"), ("sk-or-", "openrouter"), ("sk-", "openai"),
                     ("AIza", "google"), ("xai-", "xai"), ("gsk_", "groq"), ("ABSK", "bedrock"),
                     ("bedrock-api-key-", "bedrock"))


def make_placeholder(hosts: tuple[str, ...], value: str | None) -> str:
    """A placeholder shaped like the key the first host expects (else like the value itself)."""
    kind = _FORMAT_BY_HOST.get(hosts[0]) if hosts else None
    if hosts and host_provider(hosts[0]) == "bedrock":
        kind = "bedrock"
    if kind is None and value:
        kind = next((k for prefix, k in _FORMAT_BY_PREFIX if value.startswith(prefix)), None)
    return _FORMATS[kind or "generic"]()


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


# --- references, resolved at daemon start ---


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
    check_permissions(paths, owner_uid, owner_name)
    trusted = read_root_only_store(paths) if POSIX_OWNERS else read_store(paths)
    if trusted is None:
        untrusted = ResolutionError(
            f"not resolved with root's rights: {paths.store} can be written by someone other than "
            f"root; fix: sudo chown root:{owner_name} {paths.directory} {paths.store} && sudo chmod "
            f"{DIR_MODE:o} {paths.directory} && sudo chmod {FILE_MODE:o} {paths.store}")
        for item in read_store(paths):
            if item.ref:
                _AT_START[item.ref] = untrusted
        return
    for item in trusted:
        if item.ref and item.ref not in _AT_START:
            try:
                _AT_START[item.ref] = resolve(item.ref, keyring_allowed=True)
            except ResolutionError as exc:
                _AT_START[item.ref] = exc
