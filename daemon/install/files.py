"""Files and directories as install changes them: each change can be undone exactly."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from llmtap.ca import write_file
from llmtap.config import Config


class FileChange:
    """One file written with an exact mode; undo restores what was there (or nothing)."""

    def __init__(self, path: Path, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
        self.path, self.data, self.mode, self.uid, self.gid = path, data, mode, uid, gid
        self.before: tuple[bytes, int] | None = None
        self.created_dirs: list[Path] = []

    def needed(self) -> bool:
        try:
            st = self.path.stat()
            return (self.path.read_bytes() != self.data or st.st_mode & 0o7777 != self.mode
                    or (st.st_uid, st.st_gid) != (self.uid, self.gid))
        except FileNotFoundError:
            return True

    def apply(self) -> None:
        if self.path.exists():
            self.before = (self.path.read_bytes(), self.path.stat().st_mode & 0o7777)
        self.created_dirs = make_dirs(self.path.parent)
        write_file(self.path, self.data, self.mode, self.uid, self.gid)

    def undo(self) -> None:
        if self.before is not None:
            write_file(self.path, self.before[0], self.before[1], self.uid, self.gid)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        remove_dirs(self.created_dirs)


class FileChangeSet:
    """Several FileChange computed when applied (their content depends on earlier steps)."""

    def __init__(self, make: Callable[[], list[FileChange]]) -> None:
        self.make = make
        self.changes: list[FileChange] = []

    def apply(self) -> str:
        self.changes = self.make()
        for change in self.changes:
            change.apply()
        return f"updated {', '.join(str(c.path) for c in self.changes)}"

    def undo(self) -> None:
        for change in reversed(self.changes):
            change.undo()


def make_dirs(path: Path, mode: int = 0o755) -> list[Path]:
    """mkdir -p; the directories it created, outermost first."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    for directory in missing:
        directory.mkdir(mode=mode)
        os.chmod(directory, mode)
    return missing


def remove_dirs(created: list[Path]) -> None:
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            directory.rmdir()


def remove_file(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def remove_run_dir(run_dir: Path, names: Iterable[str]) -> str | None:
    """The daemon's run files, then the directory if nothing else is left in it."""
    if not run_dir.is_dir():
        return None
    for name in names:
        remove_file(run_dir / name)
    with contextlib.suppress(OSError):
        run_dir.rmdir()
        return f"removed {run_dir}"
    return None


def remove_data(config: Config, log_file: Path) -> str | None:
    """--purge: the records, the state (CA, secrets) and the service's log."""
    removed = []
    for path in (config.records_dir, config.state_dir):
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(str(path))
    if remove_file(log_file):
        removed.append(str(log_file))
    return f"deleted {', '.join(removed)}" if removed else None
