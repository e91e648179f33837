"""The maintained price data: genai-prices' bundled snapshot, or a newer one `llmtap prices update` fetched.

genai-prices (Pydantic's package) keeps prices per provider and model, with tiers, history and
request variants (batch, service tier). Its package bundles a snapshot; upstream publishes the
current data as one JSON file, which `update()` fetches, checks by parsing it, and stores in the
state directory with where and when it came from. The daemon prices with the stored data when it
is there and falls back to the bundled snapshot for models it lacks.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import genai_prices
from genai_prices import data_snapshot, update_prices
from genai_prices.types import _providers_from_raw  # what genai-prices' own updater parses with
from llmtap.atomic import write_atomic

SOURCE = "genai-prices"
UPDATE_URL = update_prices.DEFAULT_UPDATE_URL
FETCHED_NAME = "genai-prices.json"
MAX_BYTES = 32 * 1024 * 1024  # today's data is ~2 MiB; anything this big is not price data
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PriceData:
    """One snapshot of the data and where it came from (recorded with each price)."""

    snapshot: data_snapshot.DataSnapshot
    version: str  # "0.2.3 bundled", or "fetched 2026-12-02T08:00:00Z sha256:0123abcd"
    origin: str  # the package, or the URL it was fetched from

    @property
    def models(self) -> int:
        return sum(len(provider.models) for provider in self.snapshot.providers)


@functools.cache
def bundled() -> PriceData:
    """The snapshot shipped inside the installed genai-prices package."""
    version = genai_prices.__version__
    return PriceData(data_snapshot.DataSnapshot(_bundled_providers(), from_auto_update=False),
                     f"{version} bundled", f"the genai-prices {version} package")


def _bundled_providers() -> list[Any]:
    from genai_prices.data import providers

    return providers


def fetched_path(state_dir: Path) -> Path:
    return Path(state_dir) / FETCHED_NAME


def parse(raw: bytes, origin: str, fetched_at: str) -> PriceData:
    """Price data from upstream's JSON (a list of providers); ValueError when it is not that."""
    try:
        payload = json.loads(raw)
        if not isinstance(payload, list) or not payload:
            raise ValueError("expected a non-empty list of providers")
        providers = _providers_from_raw(payload)
    except ValueError as exc:  # JSONDecodeError and pydantic's ValidationError are ValueErrors
        raise ValueError(f"not genai-prices data ({_first_line(exc)})") from None
    except RecursionError:  # nesting no price data has: it would end the daemon's updater
        raise ValueError("not genai-prices data (nested too deep)") from None
    digest = hashlib.sha256(raw).hexdigest()[:16]
    snapshot = data_snapshot.DataSnapshot(providers, from_auto_update=True)
    return PriceData(snapshot, f"fetched {fetched_at} sha256:{digest}", origin)


def load_fetched(path: Path) -> PriceData | None:
    """The data `update()` stored at `path`; None when there is none. OSError/ValueError if bad."""
    try:
        stored = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON ({_first_line(exc)})") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("data"), str):
        raise ValueError(f"{path} is not a stored genai-prices update")
    return parse(stored["data"].encode(), str(stored.get("url", "")), str(stored.get("fetched_at", "")))


def fetch(url: str, timeout_s: float = TIMEOUT_S) -> bytes:
    """The data at `url` (https, or a file: URL for machines that are offline); OSError on failure."""
    if not url.startswith(("https://", "file:")):
        raise OSError(f"{url}: only https:// and file: URLs are accepted")
    context = ssl.create_default_context()  # the certificate is verified, as for any download
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:
            raw: bytes = response.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise OSError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise OSError(f"{url}: {exc.reason}") from None
    except (TimeoutError, ValueError) as exc:
        raise OSError(f"{url}: {exc}") from None
    if len(raw) > MAX_BYTES:
        raise OSError(f"{url}: more than {MAX_BYTES} bytes, which is not price data")
    return raw


def update(url: str, state_dir: Path, owner: tuple[int, int] | None = None) -> PriceData:
    """Fetches, checks and stores the data atomically; the daemon picks it up within seconds.

    `owner` (uid, gid) is who must be able to read it (the service user). Raises OSError or
    ValueError with a one-line reason; the stored data is untouched unless all went well.
    """
    raw = fetch(url)
    fetched_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    data = parse(raw, url, fetched_at)  # checked before anything is written
    stored = {"schema": 1, "url": url, "fetched_at": fetched_at, "data": raw.decode()}
    write_public(fetched_path(state_dir), json.dumps(stored).encode(), owner)
    return data


def write_public(target: Path, content: bytes, owner: tuple[int, int] | None) -> None:
    """Atomically, mode 0644, owned by `owner`: how every price file is written (override too).

    Root writes here into the service user's directory: llmtap.atomic never follows a planted
    symlink."""
    if not target.parent.exists():
        target.parent.mkdir(mode=0o700, parents=True)
        if owner is not None:
            os.chown(target.parent, *owner)
    write_atomic(target, content, 0o644, owner)  # prices are public; the worker reads them


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
