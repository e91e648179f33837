"""The daemon's status where there is no control socket (CPython has no AF_UNIX on Windows).

The in-process daemon (llmtap.platform.windows.inprocess) rewrites `status.json` next to where
the socket would be, every second, in a directory only Administrators and SYSTEM may read:
`llmtap status` from an elevated terminal reads it, as root or the llmtap group ask the socket on
Linux. There is no listener at all, so nothing is exposed to other local users. Live events (the
dashboard) need the socket and are not available this way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from llmtap.atomic import write_atomic
from llmtap.errors import RuntimeFailure

log = logging.getLogger(__name__)

NAME = "status.json"
STALE_S = 10.0  # rewritten every second: older means the daemon is gone or stuck


def path_for(control_socket: Path) -> Path:
    return control_socket.with_name(NAME)


def publish(control_socket: Path, report: dict[str, Any]) -> None:
    path = path_for(control_socket)
    try:
        data = json.dumps({**report, "published_at": time.time()}, default=str).encode("utf-8")
        write_atomic(path, data, mode=None)
    except OSError as exc:  # e.g. a reader holds it open (Windows): the next round replaces it
        log.debug("status not published: %s", exc)


def withdraw(control_socket: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path_for(control_socket).unlink()


def read(
    control_socket: Path,
    now: Callable[[], float] = time.time,
    alive: Callable[[int], bool] = psutil.pid_exists,
) -> dict[str, Any] | None:
    """The running daemon's status; None when there is no daemon (no file, or a stale one)."""
    path = path_for(control_socket)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except PermissionError:
        raise RuntimeFailure(f"no permission to read {path}: run it from an elevated terminal") from None
    except OSError as exc:
        raise RuntimeFailure(f"cannot read {path}: {exc.strerror}") from None
    try:
        report: dict[str, Any] = json.loads(text)
        fresh = now() - float(report["published_at"]) <= STALE_S
        running = fresh and alive(int(report["pid"]))
    except (ValueError, KeyError, TypeError):
        return None
    return report if running else None
