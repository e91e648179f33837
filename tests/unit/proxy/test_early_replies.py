"""A reply set at a request's headers while its body still arrives (llmtap.early_replies)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from llmtap.early_replies import EarlyReplies, drop_past
from mitmproxy.http import Response
from mitmproxy.proxy.layers.http import HttpStream
from mitmproxy.proxy.utils import ReceiveBuffer
from mitmproxy.test import tflow


def run(generator: Any) -> Any:
    """Drives a mitmproxy command generator that yields nothing; its return value."""
    try:
        next(generator)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("it yielded a command")


def stream_of(flow: Any, buffered: bytes) -> Any:
    options = SimpleNamespace(stream_large_bodies="4m", body_size_limit=None)
    buffer = ReceiveBuffer()
    for start in range(0, len(buffered), 1 << 16):  # as it arrives: 64 KB chunks
        buffer += buffered[start:start + (1 << 16)]
    return SimpleNamespace(flow=flow, request_body_buf=buffer, stream_id=1,
                           context=SimpleNamespace(options=options),
                           start_request_stream=lambda: iter(()), handle_event=lambda _: iter(()))


def test_a_refused_requests_body_past_4mb_is_dropped_as_it_comes_and_never_streamed():
    addon = EarlyReplies()
    original = HttpStream.check_body_size
    addon.load(None)
    try:
        assert HttpStream.check_body_size is not original
        refused = tflow.tflow()
        refused.response = Response.make(429, b"{}")
        refused.request.stream = False
        stream = stream_of(refused, b"x" * (5 << 20))  # past stream_large_bodies
        assert run(HttpStream.check_body_size(stream, True)) is False
        assert bytes(stream.request_body_buf) == b"x" * (4 << 20) and refused.request.stream is False
        stream.request_body_buf += b"y" * 1000  # what comes next is dropped as it comes
        assert run(HttpStream.check_body_size(stream, True)) is False
        assert bytes(stream.request_body_buf) == b"x" * (4 << 20)
        small = stream_of(refused, b"{}")  # a body under that is kept whole
        assert run(HttpStream.check_body_size(small, True)) is False
        assert bytes(small.request_body_buf) == b"{}"

        relayed = tflow.tflow()  # no reply: mitmproxy's own check, which streams it
        stream = stream_of(relayed, b"x" * (5 << 20))
        assert run(HttpStream.check_body_size(stream, True)) is False
        assert relayed.request.stream is True
        EarlyReplies().load(None)  # a second Master: put in once only
    finally:
        addon.done()
    assert HttpStream.check_body_size is original


def test_a_buffer_of_another_layout_is_dropped_whole():
    class Other:
        def __init__(self) -> None:
            self.data = b"x" * 100

        def __len__(self) -> int:
            return len(self.data)

        def clear(self) -> None:
            self.data = b""

    other = Other()
    drop_past(other, 10)  # type: ignore[arg-type]
    assert len(other) == 0
