"""The streams stage (llmtap.addons.streams): the layers' order, the end signal, nothing held."""

from __future__ import annotations

from collections.abc import Iterable

from llmtap import addons
from llmtap.addons.credentials import Credentials
from llmtap.addons.dlp import Dlp
from llmtap.addons.live import Live
from llmtap.addons.protocols import Protocols
from llmtap.addons.recorder import Recorder
from llmtap.addons.streams import StreamChain, Streams, layer_of
from mitmproxy import http
from mitmproxy.test import tflow


class Tag:
    """A layer that marks what passed through it, and what it was told at the end."""

    def __init__(self, name: str, seen: list[tuple[str, bytes]], hold: int = 0) -> None:
        self.name, self.seen, self.hold = name, seen, hold
        self.held = b""

    def __call__(self, chunk: bytes) -> bytes | Iterable[bytes]:
        self.seen.append((self.name, chunk))
        if not chunk:
            out, self.held = self.held, b""
            return out
        data = self.held + chunk
        cut = len(data) - self.hold
        self.held = data[cut:]
        return data[:cut]


def test_each_chunk_goes_through_every_layer_in_order_at_once() -> None:
    seen: list[tuple[str, bytes]] = []
    chain = StreamChain([Tag("a", seen), Tag("b", seen, hold=2), Tag("c", seen)])
    assert chain(b"h") == []  # all of it held by b: c is not called with an empty chunk
    assert chain(b"ello") == [b"hel"]  # at once: only b's bounded tail waits
    assert chain(b"") == [b"lo"]  # the end reaches each layer once, after what came before it
    assert seen == [("a", b"h"), ("b", b"h"), ("a", b"ello"), ("b", b"ello"), ("c", b"hel"),
                    ("a", b""), ("b", b""), ("c", b"lo"), ("c", b"")]


def test_the_pipeline_chains_its_layers_in_the_stated_order() -> None:
    stages = addons.pipeline()
    streams = addons.stage(stages, Streams)
    assert streams is not None and stages[-1] is streams
    assert [type(s) for s in streams.request_stages] == [Dlp, Protocols]
    assert [type(s) for s in streams.response_stages] == [Credentials, Live, Recorder, Protocols]


def test_a_held_body_or_a_stream_set_by_someone_else_is_left_alone() -> None:
    seen: list[tuple[str, bytes]] = []

    class Offers:
        def response_layer(self, flow: http.HTTPFlow) -> Tag:
            return Tag("x", seen)

    stage = Streams(response=(Offers(),))
    held = tflow.tflow(resp=True)
    stage.responseheaders(held)
    assert held.response is not None and held.response.stream is False

    def theirs(chunk: bytes) -> bytes:
        return chunk

    other = tflow.tflow(resp=True)
    assert other.response is not None
    other.response.stream = theirs
    stage.responseheaders(other)
    assert other.response.stream is theirs
    streamed = tflow.tflow(resp=True)
    assert streamed.response is not None
    streamed.response.stream = True
    stage.responseheaders(streamed)
    assert isinstance(layer_of(streamed.response.stream, Tag), Tag)


def test_no_stage_has_a_data_attribute_named_like_a_mitmproxy_hook() -> None:
    """mitmproxy calls whatever a hook's name finds on an addon: a tuple named `request` broke
    every request (AddonManagerError: not callable)."""
    from mitmproxy import hooks

    for stage in addons.pipeline():
        for name in hooks.all_hooks:
            found = getattr(stage, name, None)
            assert found is None or callable(found), (type(stage).__name__, name)
