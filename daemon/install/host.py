"""What the install steps every POSIX provider shares (directories, CA, public files) need from
their installer: Linux's and macOS's both provide it."""

from __future__ import annotations

from typing import Protocol

from llmtap.config import Config
from llmtap.install.files import FileChange
from llmtap.install.linux_system import Layout


class Host(Protocol):
    config: Config
    layout: Layout
    notes: list[str]

    def user(self) -> tuple[int, int]: ...

    def public_files(self) -> list[FileChange]: ...
