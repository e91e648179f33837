"""Checking a config file's contents: TOML tables into llmtap.config's dataclasses (each value of
the type its field declares) and the checks beyond types. Every failure is one UsageError line
naming the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtap import hostpatterns
from llmtap.dlp import ACTIONS, BUILTIN, HELD_KEY, NAME_RE, PatternError, check_pattern
from llmtap.errors import UsageError
from llmtap.rules.strings import parse_field_spec

if TYPE_CHECKING:
    from llmtap.config import Config, MetricsConfig

BACKENDS = ("auto", "nft", "iptables", "pf", "windivert")
SCOPES = ("targets", "all")
# Linux interface names: at most 15 characters, no slash, no space (net/core/dev.c).
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


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
    if r.max_connections_per_user < 0:
        raise UsageError("redirect.max_connections_per_user must be 0 (no cap) or more")
    if r.idle_timeout_s < 1:
        raise UsageError("redirect.idle_timeout_s must be at least 1")
    if not 0 <= config.upstream.pool_per_host <= 64:
        raise UsageError("upstream.pool_per_host must be 0 (no pooling) to 64")
    if config.upstream.pool_idle_s < 1:
        raise UsageError("upstream.pool_idle_s must be at least 1")
    for host in config.targets.all_hosts:
        try:
            hostpatterns.check(host)
        except ValueError as exc:
            reason = f"{exc}" if "*" in host else f"{host!r} is not a valid host name"
            raise UsageError(f"targets: {reason}") from None
    if not config.targets.all_hosts:
        raise UsageError("targets.hosts and targets.extra_hosts are both empty")
    if config.upstream.extra_ca and not Path(config.upstream.extra_ca).is_file():
        raise UsageError(f"upstream.extra_ca: {config.upstream.extra_ca} is not a file")
    webhook = config.budgets.webhook
    if webhook and not (webhook.startswith("https://") and len(webhook) > 8 and " " not in webhook):
        raise UsageError(f"budgets.webhook must be an https:// URL, not {webhook!r}")
    validate_reach(config)
    validate_history(config)
    validate_filters(config)


def validate_filters(config: Config) -> None:
    """The rules and dlp sections (regexes are compiled by RE2, as the proxy will)."""
    for spec in config.rules.all_protected_fields:
        try:
            parse_field_spec(spec)
        except ValueError as exc:
            raise UsageError(f"rules.protected_fields: {exc}") from None
    dlp = config.dlp
    if dlp.default_action not in ACTIONS:
        raise UsageError(f"dlp.default_action must be one of {', '.join(ACTIONS)}")
    for name in (*BUILTIN, HELD_KEY):
        if getattr(dlp.actions, name) not in ("", *ACTIONS):
            raise UsageError(f"dlp.actions.{name} must be one of {', '.join(ACTIONS)}")
    seen: set[str] = set()
    for pattern in dlp.patterns:
        reserved = (*BUILTIN, HELD_KEY)
        if not NAME_RE.match(pattern.name) or pattern.name in reserved or pattern.name in seen:
            raise UsageError(f"dlp.patterns: name {pattern.name!r} must be lowercase letters, digits "
                             "and _, unique, and not a built-in detector's")
        seen.add(pattern.name)
        if pattern.action not in ("", *ACTIONS):
            raise UsageError(f"dlp.patterns.{pattern.name}.action must be one of {', '.join(ACTIONS)}")
        try:
            check_pattern(pattern.pattern)
        except PatternError as exc:
            raise UsageError(f"dlp.patterns.{pattern.name}.pattern {exc}") from None


def validate_history(config: Config) -> None:
    """The records, dashboard and export sections."""
    rec, export = config.records, config.export
    for name in ("max_files", "archive_after_days", "max_body_bytes", "queue_size"):
        if getattr(rec, name) < 1:
            raise UsageError(f"records.{name} must be at least 1")
    if rec.delete_after_days < 0:
        raise UsageError("records.delete_after_days must be 0 (keep) or more")
    if config.dashboard.daily_budget_usd < 0:
        raise UsageError("dashboard.daily_budget_usd must not be negative")
    if config.prices.update_hours < 0:
        raise UsageError("prices.update_hours must be 0 (off) or more")
    if not config.prices.url.startswith(("https://", "file:")):
        raise UsageError(f"prices.url must be an https:// (or file:) URL, not {config.prices.url!r}")
    for key, url in (("otlp_endpoint", export.otlp_endpoint), ("loki.url", export.loki.url),
                     ("clickhouse.url", export.clickhouse.url)):
        if url and not re.match(r"^https?://[^/\s]+", url):
            raise UsageError(f"export.{key} must be an http(s) URL, not {url!r}")
    for key, headers in (("headers", export.headers), ("loki.headers", export.loki.headers)):
        if any("=" not in h or not h.split("=", 1)[0].strip() for h in headers):
            raise UsageError(f"export.{key} entries must look like \"name=value\"")
    for name in ("database", "table"):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", getattr(export.clickhouse, name)):
            raise UsageError(f"export.clickhouse.{name} must be a plain identifier")
    if export.timeout_s < 1 or export.spool_max_files < 1 or export.spool_max_mb < 1:
        raise UsageError("export.timeout_s, export.spool_max_files and export.spool_max_mb must "
                         "be at least 1")


def parse_listen(value: str, key: str = "explicit.listen") -> tuple[str, int]:
    """"127.0.0.1:8890" or "[::1]:8890" -> (ip, port); anything else is a usage error."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})", value.strip())
    if not match:
        raise UsageError(f"{key} must look like \"127.0.0.1:8890\" or \"[::1]:8890\", "
                         f"not {value!r}")
    host, port = (match[1], match[2]) if match[1] else (match[3], match[4])
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{key}: {host!r} is not an IP address") from None
    if not 1 <= int(port) <= 65535:
        raise UsageError(f"{key} port {port} is out of range 1-65535")
    return str(address), int(port)


def validate_metrics(metrics: MetricsConfig, proxy_port: int) -> None:
    if (address := metrics.address) is None:
        return
    if not ipaddress.ip_address(address[0]).is_loopback and not (
            metrics.allow_non_loopback and len(metrics.bearer_token) >= 16):
        raise UsageError(f"metrics.listen {metrics.listen} is not a loopback address: set "
                         "metrics.allow_non_loopback = true and a metrics.bearer_token of at least "
                         "16 characters if you mean it")
    if address[1] == proxy_port:
        raise UsageError(f"metrics.listen port {address[1]} is redirect.proxy_port: choose another")


def validate_reach(config: Config) -> None:
    """The explicit listener, the metrics listener and the gateway interfaces."""
    for name in config.redirect.gateway_interfaces:
        if not IFNAME_RE.match(name) or name == "lo":
            raise UsageError(f"redirect.gateway_interfaces: {name!r} is not a network interface name")
    validate_metrics(config.metrics, config.redirect.proxy_port)
    if (address := config.explicit.address) is None:
        return
    host, port = address
    if not ipaddress.ip_address(host).is_loopback and not config.explicit.allow_non_loopback:
        raise UsageError(f"explicit.listen {config.explicit.listen} is not a loopback address: anyone "
                         "who can reach it could use this machine's keys (set "
                         "explicit.allow_non_loopback = true if you mean it)")
    if port == config.redirect.proxy_port:
        raise UsageError(f"explicit.listen port {port} is redirect.proxy_port: choose another")


def build(cls: type, table: dict[str, Any], prefix: str) -> Any:
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
        return build(hint, value, prefix=f"{name}.")  # type: ignore[arg-type]
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item_type, _) = typing.get_args(hint)
        if not isinstance(value, list):
            raise UsageError(f"config key {name!r} must be a list")
        return tuple(_convert(item_type, item, name) for item in value)
    if origin in (types.UnionType, typing.Union):  # Path | None
        return _convert(typing.get_args(hint)[0], value, name)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # TOML's 10 is as good as 10.0 for a float key
    expected = {Path: str}.get(hint, hint)
    # bool is an int in Python; TOML keeps them apart and so do we.
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise UsageError(f"config key {name!r} must be {_type_name(hint)}, not {value!r}")
    return Path(value) if hint is Path else value


def _type_name(hint: Any) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", Path: "a path",
            float: "a number"}.get(
        hint, str(hint)
    )
