"""A reply decided at a request's headers (a refusal) while its body is still arriving.

mitmproxy sends such a reply once the whole body has been read, and buffers the body meanwhile;
past `stream_large_bodies` (4 MB) it switches the request to streaming, which it cannot do with
a reply set: it raises "Can't set a response and enable streaming at the same time" and logs a
traceback. That body goes nowhere, so here what arrives past that size is dropped as it comes:
memory stays bounded whatever its size, the request is never switched to streaming, and the
reply goes out as before, once the body has ended. The record of such a call keeps at most the
body's first 4 MB (a body under that is kept whole, as before).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from mitmproxy.proxy.layers.http import HttpStream
from mitmproxy.proxy.utils import ReceiveBuffer
from mitmproxy.utils import human

CheckBodySize = Any  # HttpStream.check_body_size: (self, request: bool) -> CommandGenerator[bool]


def _dropping(original: CheckBodySize) -> CheckBodySize:
    def check_body_size(self: HttpStream, request: bool) -> Generator[Any, Any, bool]:
        if request and self.flow.response is not None and not self.flow.request.stream:
            keep = human.parse_size(self.context.options.stream_large_bodies)
            if keep is not None and len(self.request_body_buf) > keep:
                drop_past(self.request_body_buf, keep)
            return False
        exceeded: bool = yield from original(self, request)
        return exceeded

    check_body_size.dropping = True  # type: ignore[attr-defined]
    return check_body_size


def drop_past(buffer: ReceiveBuffer, keep: int) -> None:
    """Drops the newest chunks until at most `keep` bytes are left (mitmproxy's buffer is a list
    of chunks: nothing is copied). Another layout than that one: all of it goes."""
    chunks = getattr(buffer, "_chunks", None)
    if not isinstance(chunks, list) or not isinstance(getattr(buffer, "_len", None), int):
        buffer.clear()
        return
    while len(buffer) > keep and chunks:
        buffer._len -= len(chunks.pop())


class EarlyReplies:
    """Installs the drop in mitmproxy's HTTP stream while loaded (the pipeline's proxy only)."""

    def __init__(self) -> None:
        self._original: CheckBodySize | None = None

    def load(self, loader: Any) -> None:
        current = HttpStream.check_body_size
        if getattr(current, "dropping", False):  # one Master already put it in
            return
        self._original = current
        HttpStream.check_body_size = _dropping(current)  # type: ignore[method-assign]

    def done(self) -> None:
        if self._original is not None:
            HttpStream.check_body_size = self._original  # type: ignore[method-assign]
            self._original = None
