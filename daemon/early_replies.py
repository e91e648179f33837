"""A reply decided at a request's headers (a refusal) while its body is still arriving.

mitmproxy sends such a reply once the whole body has been read, and buffers the body meanwhile;
past `stream_large_bodies` (4 MB) it switches the request to streaming, which it cannot do with
a reply set: it raises "Can't set a response and enable streaming at the same time" and logs a
traceback. That body goes nowhere, so here each chunk of it is dropped as it comes: memory stays
bounded whatever its size, the request is never switched to streaming, and the reply goes out
as before, once the body has ended. The record of such a call keeps no request body.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from mitmproxy.proxy.layers.http import HttpStream

CheckBodySize = Any  # HttpStream.check_body_size: (self, request: bool) -> CommandGenerator[bool]


def _dropping(original: CheckBodySize) -> CheckBodySize:
    def check_body_size(self: HttpStream, request: bool) -> Generator[Any, Any, bool]:
        if request and self.flow.response is not None and not self.flow.request.stream:
            self.request_body_buf.clear()
            return False
        exceeded: bool = yield from original(self, request)
        return exceeded

    check_body_size.dropping = True  # type: ignore[attr-defined]
    return check_body_size


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
