"""The one TOML configuration file (SPEC.md "Configuration").

Every section is a frozen dataclass; the loader walks the dataclass fields, so a key that is not a
field is an error naming the key (exit 2), and each value is checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtap.errors import UsageError

DEFAULT_CONFIG_PATH = Path("/etc/llmtap/config.toml")
CONFIG_ENV = "LLMTAP_CONFIG"

# The API hosts of the providers AI coding tools talk to. Only these are ever decrypted.
DEFAULT_TARGET_HOSTS: tuple[str, ...] = (
    "api.anthropic.com",
    "api.openai.com",
    "generativelanguage.googleapis.com",
    "api.mistral.ai",
    "api.x.ai",
    "api.deepseek.com",
    "api.groq.com",
    "openrouter.ai",
)

BACKENDS = ("auto", "nft", "iptables", "pf", "windivert")
SCOPES = ("targets", "all")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


@dataclass(frozen=True)
class RedirectConfig:
    backend: str = "auto"
    scope: str = "targets"
    ports: tuple[int, ...] = (443,)
    proxy_port: int = 8443
    block_quic: bool = True
    # DNS refresh of the target addresses: never wait longer than this between lookups, and keep
    # an address that vanished from DNS this long (clients may hold it in their own caches).
    dns_refresh_max_s: int = 300
    dns_grace_s: int = 900


@dataclass(frozen=True)
class TargetsConfig:
    hosts: tuple[str, ...] = DEFAULT_TARGET_HOSTS
    extra_hosts: tuple[str, ...] = ()

    @property
    def all_hosts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(h.lower() for h in (*self.hosts, *self.extra_hosts)))


@dataclass(frozen=True)
class UpstreamConfig:
    extra_ca: str = ""  # PEM bundle trusted in addition to the system roots


@dataclass(frozen=True)
class Config:
    state_dir: Path = Path("/var/lib/llmtap")
    records_dir: Path = Path("/var/lib/llmtap/records")
    run_dir: Path = Path("/run/llmtap")  # control socket and pidfile
    service_user: str = "llmtap"  # the unprivileged user (and group) the proxy worker runs as
    redirect: RedirectConfig = field(default_factory=RedirectConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    source: Path | None = field(default=None, compare=False)

    @property
    def ca_dir(self) -> Path:
        return self.state_dir / "ca"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "control.sock"


def config_path(explicit: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """The file to read and whether the user named it (a named file must exist)."""
    if explicit:
        return Path(explicit), True
    if env := os.environ.get(CONFIG_ENV):
        return Path(env), True
    return DEFAULT_CONFIG_PATH, False


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    path, named = config_path(explicit)
    if not path.exists():
        if named:
            raise UsageError(f"config file {path} does not exist (check --config or {CONFIG_ENV})")
        return Config()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    config = _build(Config, raw, prefix="")
    config = dataclasses.replace(config, source=path)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks beyond types; each failure names the key."""
    r = config.redirect
    if r.backend not in BACKENDS:
        raise UsageError(f"redirect.backend must be one of {', '.join(BACKENDS)}, not {r.backend!r}")
    if r.scope not in SCOPES:
        raise UsageError(f"redirect.scope must be one of {', '.join(SCOPES)}, not {r.scope!r}")
    for port in (*r.ports, r.proxy_port):
        if not 1 <= port <= 65535:
            raise UsageError(f"redirect port {port} is out of range 1-65535")
    if not r.ports:
        raise UsageError("redirect.ports must list at least one port")
    if r.proxy_port in r.ports:
        raise UsageError(f"redirect.proxy_port {r.proxy_port} must not be one of redirect.ports")
    for host in config.targets.all_hosts:
        if not HOSTNAME_RE.match(host):
            raise UsageError(f"targets: {host!r} is not a valid host name")
    if not config.targets.all_hosts:
        raise UsageError("targets.hosts and targets.extra_hosts are both empty")
    if config.upstream.extra_ca and not Path(config.upstream.extra_ca).is_file():
        raise UsageError(f"upstream.extra_ca: {config.upstream.extra_ca} is not a file")


def _build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise UsageError(f"unknown config key {name!r}")
        values[key] = _convert(hints[key], value, name)
    return cls(**values)


def _convert(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise UsageError(f"config key {name!r} must be a table")
        return _build(hint, value, prefix=f"{name}.")  # type: ignore[arg-type]
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item_type, _) = typing.get_args(hint)
        if not isinstance(value, list):
            raise UsageError(f"config key {name!r} must be a list")
        return tuple(_convert(item_type, item, name) for item in value)
    if origin in (types.UnionType, typing.Union):  # Path | None
        return _convert(typing.get_args(hint)[0], value, name)
    expected = {Path: str}.get(hint, hint)
    # bool is an int in Python; TOML keeps them apart and so do we.
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise UsageError(f"config key {name!r} must be {_type_name(hint)}, not {value!r}")
    return Path(value) if hint is Path else value


def _type_name(hint: Any) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", Path: "a path"}.get(
        hint, str(hint)
    )
