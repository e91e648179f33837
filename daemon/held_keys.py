"""The secrets as the proxy holds them (beside llmtap.secrets_store, which keeps them on disk):
each one's bindings, the lookup tables the credentials stage uses, and last-used times."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass, field

from llmtap import hostpatterns
from llmtap import secrets_store as store
from llmtap.hostpatterns import HostSet
from llmtap.keybind import UNBOUND, Binding
from llmtap.masking import NO_MASK, SecretMask

log = logging.getLogger("llmtap.addons.credentials")  # its lines read as the stage's, as before

USAGE_FLUSH_S = 5.0


@dataclass(frozen=True)
class Entry:
    """One secret as the worker uses it."""

    name: str
    id: str
    hosts: frozenset[str]
    header: str
    when_absent: bool
    placeholder: str
    value: str | None  # None: its reference could not be resolved
    problem: str = ""
    for_users: frozenset[str] = frozenset()  # when_absent: only for requests these users made
    binding: Binding = UNBOUND  # the programs and users its key is added for (unbound: any)

    @functools.cached_property
    def bound(self) -> HostSet:
        """The hosts as patterns (a name, or `*.openai.azure.com`: one label under it)."""
        return hostpatterns.host_set(tuple(sorted(self.hosts)))

    def allows(self, hosts: set[str]) -> bool:
        """Every name the request goes to (Host and SNI) is one the secret is bound to."""
        return all(self.bound.matches(h) for h in hosts)


@dataclass(frozen=True)
class Table:
    by_placeholder: dict[str, Entry] = field(default_factory=dict)
    by_value: dict[str, Entry] = field(default_factory=dict)  # current and retired keys
    absent: tuple[Entry, ...] = ()  # secrets added when none is sent, first created first
    pairs: tuple[tuple[bytes, bytes], ...] = ()  # (real key, placeholder) for scrubbing
    mask: SecretMask = NO_MASK  # every held value, for whatever llmtap writes or shows

    @classmethod
    def build(cls, entries: list[Entry], retired: dict[str, Entry]) -> Table:
        current = {e.value: e for e in entries if e.value}
        by_value = {**retired, **current}
        # never for anyone: a when_absent secret names its users
        absent = tuple(e for e in entries if e.when_absent and e.value and e.for_users)
        return cls(
            by_placeholder={e.placeholder: e for e in entries},
            by_value=by_value,
            absent=absent,
            pairs=tuple((v.encode(), e.placeholder.encode()) for v, e in by_value.items()),
            mask=SecretMask(by_value),
        )


class UsageLog:
    """Last-used times, in a file of the worker's own (it cannot write the root-managed store).

    A secret's first use is written at once; later ones at most every USAGE_FLUSH_S seconds.
    """

    def __init__(self, paths: store.StorePaths) -> None:
        self.paths = paths
        self.stamps = store.read_usage(paths)
        self.written: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None

    def touch(self, secret_id: str) -> None:
        self.stamps[secret_id] = store.now()
        if secret_id not in self.written:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(USAGE_FLUSH_S, self.flush)
            except RuntimeError:  # no event loop (tests): write now
                self.flush()

    def flush(self) -> None:
        self._timer = None
        data = json.dumps(self.stamps, indent=2).encode() + b"\n"
        try:
            # Not synced: a last-used time lost in a crash is not worth a disk flush on the loop.
            # The daemon's own file: -1 keeps the owner it creates it with, on any platform.
            store.write_private(self.paths.usage, data, -1, -1, durable=False)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.paths.usage, exc.strerror)
        self.written.update(self.stamps)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self.flush()
