"""The one way llmtap replaces a file: whole or nothing, and safe in a directory someone else owns.

Readers (and a full disk, or a kill at any moment) never see half a file. The temporary file is
always a new one next to the target (O_EXCL, O_NOFOLLOW, a random name), created readable by its
creator only and changed through its descriptor: root writes into directories the service user
owns, where a symlink planted at a known name would otherwise be followed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

POSIX = hasattr(os, "fchown")  # on Windows the directory's ACL decides who reads a file
_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
          | getattr(os, "O_BINARY", 0))  # Windows: no CRLF translation


def write_atomic(path: Path, data: bytes, mode: int | None = 0o644,
                 owner: tuple[int, int] | None = None, durable: bool = False) -> None:
    """Replaces `path` with `data`: `mode` (None: the umask's default), owned by `owner`
    (uid, gid; None: the writer), synced to disk first when `durable`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, _FLAGS, 0o600 if mode is not None else 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            if POSIX and owner is not None:
                os.fchown(out.fileno(), *owner)
            if POSIX and mode is not None:
                os.fchmod(out.fileno(), mode)  # after chown, which may clear set-id bits
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
