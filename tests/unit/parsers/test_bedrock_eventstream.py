"""AWS event-stream framing: our decoder against frames built byte for byte from the spec, with
botocore's own decoder (EventStreamBuffer) as the oracle."""

from __future__ import annotations

import struct
import uuid
import zlib

import aws_eventstream as aws
import pytest
from botocore.eventstream import EventStreamBuffer
from hypothesis import given, settings
from hypothesis import strategies as st
from llmtap.parsers.eventstream import EventStreamDecoder, Message
from llmtap.parsers.sse import FramingError
from parser_helpers import cuts_for, split
from streams import load

EVERY_TYPE: list[aws.Header] = [
    ("t", 0, True), ("f", 1, False), ("b", 2, -7), ("s", 3, -300), ("i", 4, 70000),
    ("l", 5, -(2**40)), ("bytes", 6, b"\x00\xffraw"), (":event-type", 7, "chunk"),
    ("ts", 8, 1_700_000_000_123), ("id", 9, uuid.UUID(int=0x1234).bytes),
]


def decode_all(data: bytes, pieces: list[bytes] | None = None, cap: int = 1 << 24) -> list[Message]:
    decoder = EventStreamDecoder(cap)
    messages: list[Message] = []
    for piece in pieces if pieces is not None else [data]:
        messages += decoder.feed(piece)
    assert not decoder.pending
    return messages


def oracle(data: bytes) -> list[tuple[dict, bytes]]:
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    return [(m.headers, m.payload) for m in buffer]


def test_a_frame_byte_for_byte() -> None:
    frame = aws.frame([(":message-type", 7, "event")], b'{"a":1}')
    head = b"\x0d:message-type\x07\x00\x05event"  # name length, name, type 7, u16 length, value
    total = 12 + len(head) + 7 + 4
    prelude = struct.pack(">II", total, len(head))
    expected = prelude + struct.pack(">I", zlib.crc32(prelude)) + head + b'{"a":1}'
    assert frame == expected + struct.pack(">I", zlib.crc32(expected))
    [message] = decode_all(frame)
    assert message == Message({":message-type": "event"}, b'{"a":1}')


def test_every_header_type_is_read_as_botocore_reads_it() -> None:
    frame = aws.frame(EVERY_TYPE, b"payload")
    [message] = decode_all(frame)
    [(headers, payload)] = oracle(frame)
    assert payload == message.payload == b"payload"
    assert message.headers["id"] == uuid.UUID(int=0x1234).bytes == headers["id"]
    assert message.headers == headers
    assert message.text(":event-type") == "chunk" and message.text("i") is None


@pytest.mark.parametrize("name", sorted(aws.BINARY_FIXTURES))
def test_fixtures_are_what_the_builder_makes_and_botocore_reads(name: str) -> None:
    data = load(name)
    assert data == aws.BINARY_FIXTURES[name]()
    ours = [(m.headers, m.payload) for m in decode_all(data)]
    assert ours == oracle(data) and len(ours) > 2


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_split_gives_the_same_messages(data: st.DataObject) -> None:
    raw = load("bedrock_converse_stream.eventstream") + aws.frame(EVERY_TYPE, b"")
    pieces = split(raw, data.draw(cuts_for(raw, 60)))
    assert decode_all(raw, pieces) == decode_all(raw)


def test_byte_by_byte_and_at_every_boundary_of_a_frame() -> None:
    frame = aws.frame(EVERY_TYPE, b"x" * 40)
    two = frame + frame
    expected = decode_all(two)
    assert decode_all(two, [two[i : i + 1] for i in range(len(two))]) == expected
    for cut in range(1, len(two)):  # prelude, headers, payload, CRC, between messages
        assert decode_all(two, [two[:cut], two[cut:]]) == expected


def test_a_message_is_given_as_soon_as_its_last_byte_arrives() -> None:
    frame = aws.event("messageStart", {"role": "assistant"})
    decoder = EventStreamDecoder()
    assert list(decoder.feed(frame[:-1])) == [] and decoder.pending
    assert len(list(decoder.feed(frame[-1:]))) == 1 and not decoder.pending


def corrupt(frame: bytes, at: int) -> bytes:
    return frame[:at] + bytes([frame[at] ^ 0x01]) + frame[at + 1 :]


@pytest.mark.parametrize(("at", "why"), [
    (3, "prelude CRC mismatch"),  # the total length
    (9, "prelude CRC mismatch"),  # the prelude's CRC itself
    (20, "message CRC mismatch"),  # a header
    (-6, "message CRC mismatch"),  # the payload
    (-1, "message CRC mismatch"),  # the message CRC
])
def test_a_corrupt_frame_is_a_framing_error(at: int, why: str) -> None:
    good = aws.event("messageStart", {"role": "assistant"})
    decoder = EventStreamDecoder()
    messages = decoder.feed(good + corrupt(good, at % len(good)))
    assert next(messages).text(":event-type") == "messageStart"  # the good one comes first
    with pytest.raises(FramingError, match=why):
        next(messages)


def test_an_oversized_message_fails_on_its_prelude_before_its_bytes_are_held() -> None:
    big = aws.frame([(":message-type", 7, "event")], b"x" * 5000)
    decoder = EventStreamDecoder(max_message_bytes=4096)
    with pytest.raises(FramingError, match="over 4096 bytes"):
        list(decoder.feed(big[:12]))  # the prelude alone tells


@pytest.mark.parametrize(("total", "headers"), [(15, 0), (16, 1), (100, 200), (300_000, 200_000)])
def test_inconsistent_lengths_are_framing_errors(total: int, headers: int) -> None:
    prelude = struct.pack(">II", total, headers)
    data = prelude + struct.pack(">I", zlib.crc32(prelude)) + b"\0" * 64
    with pytest.raises(FramingError, match="lengths are inconsistent"):
        list(EventStreamDecoder().feed(data))


@pytest.mark.parametrize("head", [
    b"\x05:type\x0a",  # an unknown value type
    b"\x05:type\x07\x00\x09abc",  # a string longer than its headers
    b"\x09:type",  # a name longer than its headers
    b"\x05:type\x07\x00\x02\xff\xfe",  # not UTF-8
    b"\x01a\x04\x00\x01",  # an integer cut short
])
def test_malformed_headers_are_framing_errors(head: bytes) -> None:
    total = 12 + len(head) + 4
    prelude = struct.pack(">II", total, len(head))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + head
    frame = body + struct.pack(">I", zlib.crc32(body))
    with pytest.raises(FramingError, match="header"):
        list(EventStreamDecoder().feed(frame))


def test_memory_holds_one_message_at_most() -> None:
    decoder = EventStreamDecoder()
    frame = aws.event("contentBlockDelta", {"delta": {"text": "x" * 100}})
    for _ in range(1000):
        list(decoder.feed(frame + frame[:7]))
        list(decoder.feed(frame[7:]))
    assert len(decoder._buf) == 0
