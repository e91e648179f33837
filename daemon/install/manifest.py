"""The install record: what install did that uninstall cannot tell by looking."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from llmtap.ca import write_file
from llmtap.install.engine import Step
from llmtap.install.files import remove_file

MANIFEST = "install.json"  # in state_dir


class Manifest:
    """Kept in state_dir/install.json, saved after every step so an interrupted install can
    still be undone."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.original: bytes | None = path.read_bytes() if path.is_file() else None
        try:
            self.data: dict[str, Any] = json.loads(self.original or b"{}")
        except ValueError:
            self.data = {}

    def restore(self) -> None:
        """Back to the file as it was before this run (after a rollback)."""
        if self.original is None:
            remove_file(self.path)
        elif self.path.parent.is_dir():
            write_file(self.path, self.original, 0o600)

    def add_dirs(self, created: list[Path]) -> None:
        known = set(self.data.get("created_dirs", []))
        self.data["created_dirs"] = sorted(known | {str(d) for d in created})

    def render(self) -> bytes:
        return (json.dumps(self.data, indent=2, sort_keys=True) + "\n").encode()

    def save_if_possible(self) -> None:
        if self.path.parent.is_dir():
            write_file(self.path, self.render(), 0o600)

    def step(self) -> Step:
        def apply() -> str:
            self.save_if_possible()
            return f"recorded the installation in {self.path}"

        return Step("install record", lambda: self.original != self.render(), apply, self.restore)


def remove_created_dirs(manifest: Manifest, purge: bool) -> str | None:
    """The directories install had to create (e.g. /etc/environment.d), once they are empty."""
    removed = []
    for directory in sorted(manifest.data.get("created_dirs", []), key=len, reverse=True):
        with contextlib.suppress(OSError):
            Path(directory).rmdir()
            removed.append(directory)
    if removed and not purge:
        manifest.data["created_dirs"] = [d for d in manifest.data["created_dirs"] if d not in removed]
        manifest.save_if_possible()
    return f"removed the empty directories {', '.join(removed)}" if removed else None
