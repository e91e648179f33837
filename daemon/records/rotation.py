"""Rotation and retention of the records directory. Nothing is deleted unless a limit says so.

1. More than `max_files` records in the directory: the oldest 20% (JSON and Markdown twins) are
   gzipped into archive/ (`NAME.json.gz`, `NAME.md.gz`).
2. Archived records older than `archive_after_days` are folded into `archive/YYYY-MM.tar.gz`.
3. Only with `delete_after_days` > 0: records older than that are deleted, wherever they are.

Every function returns the moves (record id -> new location, None for deleted) so the index can
follow. Ages come from the records' names (their start time), not from file times.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import io
import os
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from llmtap.atomic import write_atomic
from llmtap.records.store import ARCHIVE_DIR, MONTHLY_RE, name_id, name_stamp

ROTATE_FRACTION = 0.2
Moves = dict[str, str | None]


@dataclass(frozen=True)
class Policy:
    max_files: int
    archive_after_days: int
    delete_after_days: int = 0  # 0: never delete


def stamp_time(stamp: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.strptime(stamp[:15], "%Y%m%dT%H%M%S").replace(tzinfo=datetime.UTC)
    except ValueError:
        return None


def live_records(directory: Path) -> list[str]:
    """The JSON records in the directory, oldest first (names start with their UTC time)."""
    return sorted(e for e in os.listdir(directory) if e.endswith(".json") and not e.startswith("."))


def rotate(directory: Path, policy: Policy, now: datetime.datetime | None = None) -> Moves:
    now = now or datetime.datetime.now(datetime.UTC)
    moves: Moves = {}
    moves.update(archive_oldest(directory, policy.max_files))
    moves.update(fold_months(directory, now - datetime.timedelta(days=policy.archive_after_days)))
    if policy.delete_after_days > 0:
        moves.update(delete_older(directory, now - datetime.timedelta(days=policy.delete_after_days)))
    return moves


def archive_oldest(directory: Path, max_files: int) -> Moves:
    names = live_records(directory)
    if len(names) <= max_files:
        return {}
    count = max(len(names) - max_files, int(len(names) * ROTATE_FRACTION))
    archive = directory / ARCHIVE_DIR
    archive.mkdir(exist_ok=True)
    moves: Moves = {}
    for name in names[:count]:
        base = name.removesuffix(".json")
        for suffix in (".md", ".json"):  # the JSON last: while it is live, the record is too
            source = directory / f"{base}{suffix}"
            with contextlib.suppress(FileNotFoundError):
                write_atomic(archive / f"{base}{suffix}.gz", gzip.compress(source.read_bytes(), 6), mode=None)
                source.unlink()
        moves[name_id(name)] = f"{ARCHIVE_DIR}/{name}.gz"
    return moves


def fold_months(directory: Path, before: datetime.datetime) -> Moves:
    archive = directory / ARCHIVE_DIR
    if not archive.is_dir():
        return {}
    by_month: dict[str, list[str]] = defaultdict(list)
    for entry in sorted(os.listdir(archive)):
        if not entry.endswith(".json.gz"):
            continue
        started = stamp_time(name_stamp(entry))
        if started is not None and started < before:
            by_month[started.strftime("%Y-%m")].append(entry.removesuffix(".json.gz"))
    moves: Moves = {}
    for month, bases in by_month.items():
        moves.update(_fold(archive, month, bases))
    return moves


def _fold(archive: Path, month: str, bases: list[str]) -> Moves:
    """Adds the records to YYYY-MM.tar.gz (rewritten whole: tar.gz cannot be appended to)."""
    target = archive / f"{month}.tar.gz"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as out:
        if target.exists():
            with tarfile.open(target, "r:gz") as old:
                for member in old.getmembers():
                    out.addfile(member, old.extractfile(member))
        for base in bases:
            for suffix in (".json", ".md"):
                path = archive / f"{base}{suffix}.gz"
                if path.exists():
                    _add(out, f"{base}{suffix}", gzip.decompress(path.read_bytes()),
                         path.stat().st_mtime)
    write_atomic(target, buffer.getvalue(), mode=None)
    for base in bases:
        for suffix in (".json.gz", ".md.gz"):
            with contextlib.suppress(FileNotFoundError):
                (archive / f"{base}{suffix}").unlink()
    return {name_id(base): f"{ARCHIVE_DIR}/{month}.tar.gz#{base}.json" for base in bases}


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o640
    tar.addfile(info, io.BytesIO(data))


def delete_older(directory: Path, before: datetime.datetime) -> Moves:
    """The retention limit: every record that started before `before` goes, wherever it is."""
    moves: Moves = {}
    for name in live_records(directory):
        started = stamp_time(name_stamp(name))
        if started is not None and started < before:
            for suffix in (".json", ".md"):
                with contextlib.suppress(FileNotFoundError):
                    (directory / f"{name.removesuffix('.json')}{suffix}").unlink()
            moves[name_id(name)] = None
    archive = directory / ARCHIVE_DIR
    if not archive.is_dir():
        return moves
    for entry in os.listdir(archive):
        if entry.endswith((".json.gz", ".md.gz")):
            started = stamp_time(name_stamp(entry))
            if started is not None and started < before:
                (archive / entry).unlink()
                if entry.endswith(".json.gz"):
                    moves[name_id(entry)] = None
        elif MONTHLY_RE.match(entry) and _month_end(entry) < before:
            with tarfile.open(archive / entry, "r:gz") as tar:
                ids = [name_id(m) for m in tar.getnames() if m.endswith(".json")]
            (archive / entry).unlink()
            moves.update(dict.fromkeys(ids))
    return moves


def _month_end(entry: str) -> datetime.datetime:
    year, month = int(entry[:4]), int(entry[5:7])
    return datetime.datetime(year + month // 12, month % 12 + 1, 1, tzinfo=datetime.UTC)
