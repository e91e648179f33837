"""The files of the records directory: names, atomic writes, system prompts, archives.

A record's location is a string relative to the records directory: `NAME.json` (live),
`archive/NAME.json.gz` (rotated) or `archive/YYYY-MM.tar.gz#NAME.json` (folded by month).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from llmtap.atomic import write_atomic
from llmtap.jsontext import pretty

ARCHIVE_DIR = "archive"
SYSTEM_DIR = "system"
INDEX_NAME = "index.sqlite"
MONTHLY_RE = re.compile(r"^\d{4}-\d{2}\.tar\.gz$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# What a location names (before any `#member`): a file here, in archive/ or in system/.
LOCATION_RE = re.compile(r"^(?:(?:archive|system)/)?[^/\\\0.][^/\\\0]*\Z")
MAX_READ = 256 * 1024 * 1024  # no record file llmtap writes comes near this


def record_name(record: dict[str, Any]) -> str:
    """`<UTC timestamp>_<model>_<request id>`, safe as a file name and sorted by time."""
    stamp = (record.get("started_at") or "unknown").replace(":", "").replace("-", "")
    model = _UNSAFE.sub("_", str(record.get("model") or "unknown"))[:80].strip("._") or "unknown"
    return f"{stamp}_{model}_{_UNSAFE.sub('_', str(record['id']))}"


def name_stamp(name: str) -> str:
    """The UTC timestamp part of a record name, e.g. `20250102T030405.678Z`."""
    return Path(name).name.split("_", 1)[0]


def name_id(name: str) -> str:
    base = Path(name).name
    for suffix in (".gz", ".json", ".md"):
        base = base.removesuffix(suffix)
    return base.rsplit("_", 1)[-1]


def record_bytes(record: dict[str, Any]) -> bytes:
    return (pretty(record) + "\n").encode("utf-8")


def save_system_prompt(directory: Path, sha256: str, text: str) -> str:
    """Archives a system prompt once per distinct text; returns its location."""
    location = f"{SYSTEM_DIR}/{sha256}.txt"
    path = directory / location
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, text.encode("utf-8"), mode=None)
    return location


def write_exchange(directory: Path, record: dict[str, Any], markdown: str | None) -> str:
    """Writes the Markdown twin, then the JSON record (its presence means "written").

    On any failure neither is left behind, and the OSError goes to the caller to count.
    """
    name = record_name(record)
    md_path = directory / f"{name}.md"
    try:
        if markdown is not None:
            write_atomic(md_path, markdown.encode("utf-8"), mode=None)
        write_atomic(directory / f"{name}.json", record_bytes(record), mode=None)
    except OSError:
        with contextlib.suppress(OSError):
            md_path.unlink()
        raise
    return f"{name}.json"


# --- reading, wherever a record lives -------------------------------------------------------


def read_location(directory: Path, location: str) -> bytes | None:
    """The bytes at a location (a JSON record or its `.md` twin), None if gone.

    The tree and its index are the service user's, and root reads them (history, the UI): only
    a name llmtap writes is read, without following a symbolic link, and at most MAX_READ bytes
    of it (a planted gzip bomb)."""
    archive, _, member = location.partition("#")
    if not LOCATION_RE.match(archive):
        return None
    try:
        with _open_inside(directory, archive) as raw:
            if member:
                with tarfile.open(fileobj=raw, mode="r:gz") as tar:
                    extracted = tar.extractfile(member)
                    return extracted.read(MAX_READ) if extracted else None
            if archive.endswith(".gz"):
                with gzip.GzipFile(fileobj=raw) as unzipped:
                    return unzipped.read(MAX_READ)
            return raw.read(MAX_READ)
    except (FileNotFoundError, KeyError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a symbolic link where llmtap writes none
            return None
        raise


def _open_inside(directory: Path, location: str) -> BinaryIO:
    """`location` (at most `dir/name`) under `directory`, no component a symbolic link."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    if not nofollow or os.open not in os.supports_dir_fd:  # Windows: no service user to fear
        return open(directory / location, "rb")
    head, _, name = location.rpartition("/")
    base = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if head:
            sub = os.open(head, os.O_RDONLY | os.O_DIRECTORY | nofollow, dir_fd=base)
            os.close(base)
            base = sub
        fd = os.open(name, os.O_RDONLY | nofollow | os.O_NONBLOCK, dir_fd=base)  # a FIFO: no wait
    finally:
        os.close(base)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileNotFoundError(location)
    return os.fdopen(fd, "rb")


def markdown_location(location: str) -> str:
    return location.replace(".json", ".md", 1) if "#" in location else re.sub(
        r"\.json(\.gz)?$", lambda m: ".md" + (m.group(1) or ""), location)


def iter_locations(directory: Path) -> Iterator[str]:
    """Every record's location: live files, rotated gz files, monthly archives."""
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(directory)):
            if entry.endswith(".json") and not entry.startswith("."):
                yield entry
    archive = directory / ARCHIVE_DIR
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(archive)):
            if entry.endswith(".json.gz"):
                yield f"{ARCHIVE_DIR}/{entry}"
            elif MONTHLY_RE.match(entry):
                with tarfile.open(archive / entry, "r:gz") as tar:
                    for member in tar.getnames():
                        if member.endswith(".json"):
                            yield f"{ARCHIVE_DIR}/{entry}#{member}"


def find_location(directory: Path, record_id: str) -> str | None:
    """Where a record is now, by scanning (for an index that has not followed a rotation)."""
    suffix = f"_{record_id}.json"
    return next((loc for loc in iter_locations(directory)
                 if loc.endswith((suffix, suffix + ".gz"))), None)


def iter_records(directory: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) for every readable record; unreadable files are skipped."""
    monthly: dict[str, tarfile.TarFile] = {}
    try:
        for location in iter_locations(directory):
            raw = _read_cached(directory, location, monthly)
            if raw is None:
                continue
            with contextlib.suppress(ValueError):
                record = json.loads(raw)
                if isinstance(record, dict) and "id" in record:
                    yield location, record
    finally:
        for tar in monthly.values():
            tar.close()


def _read_cached(directory: Path, location: str, open_tars: dict[str, tarfile.TarFile]
                 ) -> bytes | None:
    if "#" not in location:
        try:
            return read_location(directory, location)
        except (OSError, EOFError, gzip.BadGzipFile):
            return None
    archive, member = location.split("#", 1)
    if archive not in open_tars:
        open_tars[archive] = tarfile.open(directory / archive, "r:gz")  # noqa: SIM115 - closed by the caller
    extracted = open_tars[archive].extractfile(member)
    return extracted.read() if extracted else None
