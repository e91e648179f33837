"""Linux process helpers: tie a child's life to its parent's."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

_PR_SET_PDEATHSIG = 1
try:  # loaded at import: the worker could not load it after its privilege drop
    _libc: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # Windows: no such library, and nothing there calls this module's helpers
    _libc = None


def parent_death_signal(expected_parent: int, sig: int = signal.SIGTERM) -> None:
    """Asks the kernel to send `sig` to this process when its parent dies.

    `expected_parent` is the parent's pid taken before the fork: if the parent is already gone we
    signal ourselves at once. Call this after any change of user or group: the kernel clears the
    setting on a credential change.
    """
    if _libc is None:
        raise OSError("no C library: parent_death_signal is Linux-only")
    if _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    if os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)
