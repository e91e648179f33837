"""Records: the recorder addon, Markdown twins, the index, rotation/retention, read-only reading,
the history commands, and the OTLP exporter against a minimal OTLP/HTTP receiver."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import http.server
import json
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import streams
from cli_runs import run_cli, write_config
from llmtap.addons.recorder import Recorder
from llmtap.addons.streams import Streams
from llmtap.cli.history import parse_since
from llmtap.config import ExportConfig, RecordsConfig
from llmtap.flow import SYSTEM_PROMPT, fields
from llmtap.records import export, rotation, store
from llmtap.records.capture import (
    Body,
    BodyCapture,
    Exchange,
    mask_path,
    mask_secrets,
    masked_headers,
    tee_stream,
)
from llmtap.records.index import Index, index_path
from llmtap.records.markdown import render, sse_text
from llmtap.records.writer import RecordWriter, WriterSettings, exporters
from mitmproxy.test import taddons, tflow
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from testbed import wait_for

SYSTEM = "You are a careful assistant."
ANTHROPIC_SSE = (
    b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude-x"}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Hello "}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"world"}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


def anthropic_flow(stream: bool = False, path: str = "/v1/messages") -> Any:
    flow = tflow.tflow(resp=True)
    flow.request.host = "api.anthropic.com"
    flow.request.headers["host"] = "api.anthropic.com"
    flow.request.path = path
    flow.request.method = "POST"
    flow.request.headers["x-api-key"] = "sk-ant-api03-REALSECRETVALUE"
    flow.request.headers["authorization"] = "Bearer sk-proj-ANOTHERSECRET"
    flow.request.headers["content-type"] = "application/json"
    flow.request.content = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64,
                                       "system": SYSTEM, "stream": stream,
                                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    flow.response.headers["content-type"] = "text/event-stream" if stream else "application/json"
    flow.response.content = json.dumps(
        {"type": "message", "content": [{"type": "text", "text": "Hi there"}]}).encode()
    if stream:
        flow.response.raw_content = None  # as mitmproxy leaves a streamed body
    fields(flow)["model"] = "claude-sonnet-4-5"  # as the protocols stage would contribute
    flow.metadata[SYSTEM_PROMPT] = SYSTEM
    return flow


def record_once(tmp_path: Path, *flows: Any, toml: str = "") -> Recorder:
    config = tmp_path / "config.toml"
    config.write_text(toml)
    recorder = Recorder()
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, llmtap_records_dir=str(tmp_path),
                       llmtap_config_file=str(config))
        for flow in flows:
            if flow.metadata.get("stream_body") is not None:
                flow.response.stream = True
                Streams(response=(recorder,)).responseheaders(flow)
                for piece in (flow.metadata["stream_body"][:50], flow.metadata["stream_body"][50:],
                              b""):
                    flow.response.stream(piece)
            recorder.response(flow)
        recorder.done()
    return recorder


def test_record_markdown_twin_system_prompt_and_index(tmp_path):
    first, second = anthropic_flow(), anthropic_flow()
    record_once(tmp_path, first, second)
    records = sorted(tmp_path.glob("*.json"))
    assert len(records) == 2
    record = json.loads(records[0].read_text())
    stamp = record["started_at"].replace(":", "").replace("-", "")
    assert records[0].name == f"{stamp}_claude-sonnet-4-5_{record['id']}.json"
    for key in ("id", "started_at", "ended_at", "host", "method", "path", "status", "provider",
                "api", "model", "stream", "request", "usage", "cost_usd", "stop_reason", "ttft_ms",
                "duration_ms", "chunks", "process", "credential", "rules_hit", "dlp_hits", "error"):
        assert key in record, key
    # The system prompt is archived once, by SHA-256, and referenced from both records.
    sha = hashlib.sha256(SYSTEM.encode()).hexdigest()
    assert record["system_prompt"] == f"system/{sha}.txt"
    assert [p.name for p in (tmp_path / "system").iterdir()] == [f"{sha}.txt"]
    assert (tmp_path / "system" / f"{sha}.txt").read_text() == SYSTEM
    md = records[0].with_suffix(".md").read_text()
    assert '"max_tokens": 64' in md and '"text": "Hi there"' in md  # pretty-printed bodies
    assert "x-api-key: ••••" in md and "authorization: Bearer ••••" in md
    everything = "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file()
                         and p.suffix in (".json", ".md", ".txt"))
    assert "REALSECRETVALUE" not in everything and "ANOTHERSECRET" not in everything
    index = Index.open_reader(tmp_path)
    assert {row["id"] for row in index.calls()} == {first.id, second.id}
    assert index.calls()[0]["location"].endswith(".json")


def test_streamed_response_twin_has_the_assembled_text(tmp_path):
    flow = anthropic_flow(stream=True)
    flow.metadata["stream_body"] = ANTHROPIC_SSE
    record_once(tmp_path, flow)
    [md] = tmp_path.glob("*.md")
    text = md.read_text()
    assert "Text assembled from the stream:" in text and "Hello world" in text
    assert "raw stream" in text and "message_stop" in text


def test_tee_keeps_the_stream_unchanged_and_bounded():
    seen: list[bytes] = []

    def inner(data: bytes) -> bytes:
        seen.append(data)
        return data.upper()

    capture = BodyCapture(limit=5)
    tee = tee_stream(inner, capture)
    assert tee(b"abc") == b"ABC" and tee(b"defgh") == b"DEFGH" and tee(b"") == b""
    assert bytes(capture.data) == b"abcde" and capture.size == 8 and capture.truncated
    assert seen == [b"abc", b"defgh", b""]
    assert tee_stream(True, BodyCapture(10))(b"xy") == b"xy"


def test_credential_query_parameters_are_masked():
    assert mask_path("/v1beta/models/g:generateContent?key=AIzaSECRET&alt=sse") == \
        "/v1beta/models/g:generateContent?key=••••&alt=sse"
    assert mask_path("/v1/messages?beta=true") == "/v1/messages?beta=true"
    presigned = ("/model/m/invoke?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE"
                 "%2F20251202%2Fus-east-1%2Fbedrock%2Faws4_request&X-Amz-Date=20251202T081500Z"
                 "&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEJr&X-Amz-Signature=5d672d79c15b13162d9279b0855cfba6")
    assert mask_path(presigned) == ("/model/m/invoke?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=••••"
                                    "&X-Amz-Date=20251202T081500Z&X-Amz-Security-Token=••••"
                                    "&X-Amz-Signature=••••")


def test_aws_credentials_are_masked_in_headers_and_text():
    sigv4 = ("AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20251202/us-east-1/bedrock/aws4_request, "
             "SignedHeaders=host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6")
    assert masked_headers([("Authorization", sigv4), ("X-Amz-Security-Token", "IQoJb3JpZ2luX2VjEJr"),
                           ("X-Amz-Date", "20251202T081500Z")]) == [
        ("Authorization", "AWS4-HMAC-SHA256 ••••"), ("X-Amz-Security-Token", "••••"),
        ("X-Amz-Date", "20251202T081500Z")]
    key = "ABSKQmVkcm9ja0FQSUtleS1hYmNkLWF0LTEyMzQ1Njc4OTAxMjpGYWtlU2VjcmV0"
    short = "bedrock-api-key-YmVkcm9jay5hbWF6b25hd3MuY29tLz9BY3Rpb249Q2FsbFdpdGhCZWFyZXJUb2tlbg%3D%3D"
    masked = mask_secrets(f"key {key} and {short}")
    assert key not in masked and short not in masked and masked.startswith("key ABS")


def test_an_aws_event_stream_twin_shows_its_messages_and_text():
    def twin(body: bytes) -> str:
        return render({"id": "r1"}, Exchange([], [], Body(b"", 0),
                                             Body(body, len(body), None, streams.EVENTSTREAM)))

    raw = streams.load("bedrock_invoke_stream.eventstream")
    whole = twin(raw)
    assert "Je vérifie la météo à Paris. Un instant… ☀️" in whole  # from the decoded chunks
    assert 'chunk: {"type":"message_stop","amazon-bedrock-invocationMetrics"' in whole
    first = int.from_bytes(raw[:4], "big")  # the first message's length
    for broken in (raw[:-10], raw[:first] + b"\xff" * 40):  # cut inside a message; a corrupt one
        md = twin(broken)
        assert '"type":"message_start"' in md and "message_stop" not in md and "\x00" not in md


def test_sse_text_for_each_provider():
    openai = b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\ndata: {"choices":[{"delta":' \
             b'{"content":"lo"}}]}\n\ndata: [DONE]\n\n'
    responses = b'data: {"type":"response.output_text.delta","delta":"Hi"}\n\n'
    gemini = b'data: {"candidates":[{"content":{"parts":[{"text":"Yo"}]}}]}\n\n'
    assert sse_text(ANTHROPIC_SSE) == "Hello world"
    assert (sse_text(openai), sse_text(responses), sse_text(gemini)) == ("Hello", "Hi", "Yo")


def test_full_queue_and_refused_disk_are_counted_not_raised(tmp_path):
    writer = RecordWriter(tmp_path / "missing", WriterSettings(RecordsConfig(queue_size=2)))
    for n in range(50):
        writer.submit({"id": f"r{n}", "started_at": None, "model": None})
    writer.close()
    assert writer.written == 0
    assert writer.dropped == 50  # some by the full queue, the rest by the missing directory


# --- rotation and retention ------------------------------------------------------------------


def make_records(directory: Path, count: int, start: datetime.datetime, step_hours: float) -> None:
    """Small records written the way the daemon writes them, indexed too."""
    directory.mkdir(exist_ok=True)
    writer = RecordWriter(directory, WriterSettings(RecordsConfig(max_files=10**6)))
    for n in range(count):
        started = start + datetime.timedelta(hours=n * step_hours)
        writer.submit({"id": f"rec{n:05d}", "started_at": started.isoformat().replace("+00:00", "Z"),
                       "model": "gpt-4.1", "host": "api.openai.com", "usage": {"input_tokens": n},
                       "cost_usd": 0.001})
    writer.close()
    assert writer.written == count


def tree_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        stat = path.stat()
        digest.update(f"{path.relative_to(directory)}:{stat.st_mode}:{stat.st_mtime_ns}".encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


NOW = datetime.datetime(2025, 6, 15, 12, tzinfo=datetime.UTC)


def test_rotation_archives_oldest_fifth_and_folds_months(tmp_path):
    # 600 records, one every 6 hours: 2025-01-01 .. 2025-05-30.
    make_records(tmp_path, 600, datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC), 6)
    before = {r["id"] for _, r in store.iter_records(tmp_path)}
    now = datetime.datetime(2025, 5, 20, tzinfo=datetime.UTC)
    moves = rotation.rotate(tmp_path, rotation.Policy(max_files=100, archive_after_days=30), now)
    live = rotation.live_records(tmp_path)
    assert len(live) == 100 and len(moves) == 500
    assert live[0].startswith("20250506T")  # the newest are kept
    archive = tmp_path / "archive"
    months = sorted(p.name for p in archive.glob("*.tar.gz"))
    assert months == ["2025-01.tar.gz", "2025-02.tar.gz", "2025-03.tar.gz", "2025-04.tar.gz"]
    with tarfile.open(archive / "2025-02.tar.gz") as tar:
        assert len([m for m in tar.getnames() if m.endswith(".json")]) == 28 * 4
    recent_gz = sorted(archive.glob("*.json.gz"))  # younger than 30 days: still one gz each
    assert recent_gz and all(p.name >= "20250420" for p in recent_gz)
    # Nothing lost: every record is still readable, and the index follows the moves.
    assert {r["id"] for _, r in store.iter_records(tmp_path)} == before
    index = Index.open_writer(index_path(tmp_path))
    index.relocate(moves)
    located = {row["id"]: row["location"] for row in index.calls()}
    assert located["rec00000"] == "archive/2025-01.tar.gz#" + live_name(tmp_path, "rec00000")
    assert json.loads(store.read_location(tmp_path, located["rec00000"]) or b"")["id"] == "rec00000"
    assert index.rebuild(tmp_path) == 600
    assert {row["id"]: row["location"] for row in index.calls()} == located


def test_a_batch_is_indexed_in_one_go_even_when_it_rotates_midway(tmp_path):
    """The writer process hands records over in batches; their index rows are written at the
    batch's end, except that rotation (which moves indexed rows) indexes those before it first."""
    writer = RecordWriter(tmp_path, WriterSettings(RecordsConfig(max_files=40, archive_after_days=0)),
                          threaded=False)
    writer.start()
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    batch = [({"id": f"rec{n:05d}", "model": "gpt-4.1", "host": "api.openai.com",
               "started_at": (start + datetime.timedelta(hours=n)).isoformat().replace("+00:00", "Z"),
               "usage": {"input_tokens": n}}, None) for n in range(60)]
    writer.handle_batch(batch)
    indexed = {row["id"]: row["location"] for row in Index.open_reader(tmp_path).calls()}
    assert writer.written == 60 and writer.index_errors == 0
    assert indexed == {r["id"]: loc for loc, r in store.iter_records(tmp_path)}  # as a reindex says
    assert any(loc.startswith("archive/") for loc in indexed.values())
    assert writer._index is not None
    writer._index.conn.execute("DROP TABLE calls")  # the index breaks: a batch's rows fail together
    writer.handle_batch(batch[:5])
    assert (writer.written, writer.index_errors) == (65, 5)
    writer.finish()


def live_name(directory: Path, record_id: str) -> str:
    for location in store.iter_locations(directory):
        if record_id in location:
            return location.split("#")[-1]
    raise AssertionError(record_id)


def test_retention_deletes_only_when_a_limit_says_so(tmp_path):
    make_records(tmp_path, 300, datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC), 12)
    keep = rotation.Policy(max_files=50, archive_after_days=30)
    rotation.rotate(tmp_path, keep, NOW)
    rotation.rotate(tmp_path, keep, NOW + datetime.timedelta(days=400))  # everything is old now
    assert len(list(store.iter_records(tmp_path))) == 300
    moves = rotation.rotate(tmp_path, rotation.Policy(50, 30, delete_after_days=60), NOW)
    deleted = {k for k, v in moves.items() if v is None}
    remaining = {r["id"] for _, r in store.iter_records(tmp_path)}
    assert deleted and not deleted & remaining and len(deleted) + len(remaining) == 300
    cutoff = NOW - datetime.timedelta(days=60)
    for _, record in store.iter_records(tmp_path):  # whole months before the cutoff are gone
        started = datetime.datetime.fromisoformat(record["started_at"].replace("Z", "+00:00"))
        assert started >= cutoff.replace(day=1, hour=0)


def test_read_only_history_changes_nothing(tmp_path, capsys):
    records = tmp_path / "records"
    make_records(records, 120, datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC), 24)
    moves = rotation.rotate(records, rotation.Policy(max_files=50, archive_after_days=30), NOW)
    writer = Index.open_writer(index_path(records))
    writer.relocate(moves)
    writer.close()
    config = str(write_config(tmp_path, records))
    for with_index in (True, False):
        if not with_index:
            for side in ("", "-wal", "-shm"):
                Path(f"{index_path(records)}{side}").unlink(missing_ok=True)
        before = tree_hash(records)
        code, out, _ = run_cli(capsys, "logs", "--read-only", "-n", "0", "--json", "--config", config)
        assert code == 0 and len(out.splitlines()) == 120
        assert run_cli(capsys, "stats", "--by", "day", "--read-only", "--config", config)[0] == 0
        code, out, _ = run_cli(capsys, "show", "rec00003", "--json", "--read-only", "--config", config)
        assert code == 0 and json.loads(out)["id"] == "rec00003"  # from a monthly archive
        code, out, _ = run_cli(capsys, "export", "--format", "jsonl", "--read-only", "--config", config)
        assert code == 0 and len(out.splitlines()) == 120
        assert tree_hash(records) == before
    # A live daemon's index, with writes still in its WAL: read from the files instead.
    live = Index.open_writer(index_path(records))
    live.rebuild(records)
    try:
        before = tree_hash(records)
        code, out, _ = run_cli(capsys, "logs", "--read-only", "-n", "0", "--config", config)
        assert code == 0 and len(out.splitlines()) == 120
        assert tree_hash(records) == before
    finally:
        live.close()


# --- history commands ------------------------------------------------------------------------


def test_history_commands(tmp_path, capsys):
    records = tmp_path / "records"
    records.mkdir()
    writer = RecordWriter(records)
    now = datetime.datetime.now(datetime.UTC)
    for n, (model, tool, cost, ttft) in enumerate([("claude-sonnet-4-5", "claude", 0.02, 300.0),
                                                   ("claude-sonnet-4-5", "claude", 0.04, 500.0),
                                                   ("mystery-model", "python", None, 100.0)]):
        writer.submit({"id": f"abcd{n:04d}-x", "model": model, "host": "api.anthropic.com",
                       "started_at": (now - datetime.timedelta(minutes=10 - n)).isoformat(),
                       "path": "/v1/messages", "status": 200, "cost_usd": cost, "ttft_ms": ttft,
                       "usage": {"input_tokens": 100, "output_tokens": 10, "cache_read_tokens": 5},
                       "process": {"pid": 42 + n, "name": "node" if tool == "claude" else "python3",
                                   "tool": tool}})
    writer.close()
    config = str(write_config(tmp_path, records))
    code, out, _ = run_cli(capsys, "stats", "--by", "model", "--json", "--config", config)
    stats = json.loads(out)
    claude = next(g for g in stats["groups"] if g["key"] == "claude-sonnet-4-5")
    assert (claude["calls"], claude["input_tokens"], claude["cache_read_tokens"]) == (2, 200, 10)
    assert claude["cost_usd"] == pytest.approx(0.06)
    assert (claude["ttft_p50_ms"], claude["ttft_p95_ms"]) == (300.0, 500.0)
    [unpriced] = stats["unpriced"]
    assert (unpriced["model"], unpriced["host"], unpriced["calls"]) == (
        "mystery-model", "api.anthropic.com", 1)
    code, out, _ = run_cli(capsys, "stats", "--by", "process", "--config", config)
    assert code == 0 and "claude" in out and "mystery-model (1)" in out
    code, out, _ = run_cli(capsys, "logs", "--process", "python", "--config", config)
    assert code == 0 and len(out.splitlines()) == 1 and "mystery-model" in out
    code, out, _ = run_cli(capsys, "logs", "--since", "1h", "--model", "sonnet", "--config", config)
    assert len(out.splitlines()) == 2
    code, out, _ = run_cli(capsys, "export", "--format", "csv", "--config", config)
    assert out.splitlines()[0].startswith("id,location,started_at") and len(out.splitlines()) == 4
    assert run_cli(capsys, "show", "abcd", "--config", config)[0] == 2  # ambiguous
    assert run_cli(capsys, "stats", "--by", "colour", "--config", config)[2].strip() == \
        "llmtap: --by must be one of model, process, host, day, budget, not 'colour'"
    assert run_cli(capsys, "logs", "--since", "yesterday", "--config", config)[0] == 2
    index_path(records).unlink()
    code, out, _ = run_cli(capsys, "reindex", "--config", config)
    assert code == 0 and out.strip() == f"indexed 3 records from {records}"


def test_parse_since():
    assert parse_since("90m", now=10_000.0) == 10_000.0 - 5400
    assert parse_since("2025-01-02") == datetime.datetime(2025, 1, 2, tzinfo=datetime.UTC).timestamp()
    assert parse_since(None) is None


# --- OpenTelemetry export --------------------------------------------------------------------


class Receiver:
    """A minimal OTLP/HTTP traces receiver: decodes each protobuf export request."""

    def __init__(self, port: int = 0) -> None:
        self.spans: list[Any] = []
        self.metrics: list[Any] = []
        received, metrics = self.spans, self.metrics

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/v1/metrics":
                    for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics:
                        metrics.extend(m for sm in rm.scope_metrics for m in sm.metrics)
                    self.send_response(200)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        received.extend((resource_spans.resource, s,
                                         {k.lower(): v for k, v in self.headers.items()})
                                        for s in scope_spans.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attributes(span: Any) -> dict[str, Any]:
    found = {}
    for kv in span.attributes:
        value = kv.value
        kind = value.WhichOneof("value")
        found[kv.key] = [v.string_value for v in value.array_value.values] \
            if kind == "array_value" else getattr(value, kind)
    return found


RECORD = {"id": "r1", "started_at": "2025-06-01T10:00:00.000Z", "ended_at": "2025-06-01T10:00:02.500Z",
          "host": "api.anthropic.com", "method": "POST", "status": 200, "provider": "anthropic",
          "api": "messages", "model": "claude-sonnet-4-5", "stop_reason": "end_turn",
          "request": {"max_tokens": 64, "temperature": 0.5, "conversation_id": "sess-1"},
          "usage": {"input_tokens": 10, "output_tokens": 20, "cache_read_tokens": 100,
                    "cache_write_5m_tokens": 5, "cache_write_1h_tokens": 0, "reasoning_tokens": None},
          "cost_usd": "0.0012", "ttft_ms": 321.5, "process": {"pid": 7, "name": "node", "tool": "claude"}}


def test_otlp_span_follows_genai_conventions(tmp_path):
    receiver = Receiver()
    config = ExportConfig(otlp_endpoint=f"http://127.0.0.1:{receiver.port}/v1/traces",
                          headers=("authorization=Bearer collector-token",))
    exporter = exporters(config, tmp_path / "spool")
    try:
        exporter.submit(RECORD)
        assert wait_for(lambda: receiver.spans and receiver.metrics)
    finally:
        exporter.close()
        receiver.close()
    resource, span, headers = receiver.spans[0]
    assert headers["authorization"] == "Bearer collector-token"
    assert span.name == "chat claude-sonnet-4-5" and span.kind == span.SPAN_KIND_CLIENT
    assert span.end_time_unix_nano - span.start_time_unix_nano == 2_500_000_000
    attrs = attributes(span)
    assert attrs["gen_ai.request.model"] == "claude-sonnet-4-5"
    assert attrs["gen_ai.provider.name"] == "anthropic" and attrs["gen_ai.operation.name"] == "chat"
    assert "gen_ai.system" not in attrs  # deprecated by gen_ai.provider.name
    assert attrs["gen_ai.conversation.id"] == "sess-1"
    assert attrs["gen_ai.usage.cache_creation.input_tokens"] == 5
    assert attrs["gen_ai.usage.input_tokens"] == 115  # the whole prompt, cached included
    assert attrs["gen_ai.usage.output_tokens"] == 20
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 100
    assert attrs["gen_ai.request.max_tokens"] == 64 and attrs["gen_ai.request.temperature"] == 0.5
    assert attrs["gen_ai.response.finish_reasons"] == ["end_turn"]
    assert attrs["llmtap.cost_usd"] == pytest.approx(0.0012) and attrs["llmtap.tool"] == "claude"
    assert {kv.key: kv.value.string_value for kv in resource.attributes}["service.name"] == "llmtap"
    assert exporter.counters()["export_otlp_traces_sent"] == 1
    metrics = {m.name: m for m in receiver.metrics}
    usage = metrics["gen_ai.client.token.usage"]
    assert usage.unit == "{token}" and usage.histogram.aggregation_temporality == 1  # delta
    by_type = {attributes(p)["gen_ai.token.type"]: p for p in usage.histogram.data_points}
    assert (by_type["input"].sum, by_type["output"].sum) == (115, 20)
    assert attributes(by_type["input"])["gen_ai.provider.name"] == "anthropic"
    assert list(by_type["input"].explicit_bounds)[:3] == [1, 4, 16]
    [duration] = metrics["gen_ai.client.operation.duration"].histogram.data_points
    assert duration.count == 1 and duration.sum == 2.5 and metrics[
        "gen_ai.client.operation.duration"].unit == "s"


def test_otlp_collector_down_spools_then_delivers(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "RETRY_MIN_S", 0.2)
    probe = Receiver()
    port = probe.port
    probe.close()  # nothing listens there now
    exporter = exporters(
        ExportConfig(otlp_endpoint=f"http://127.0.0.1:{port}/v1/traces", spool_max_files=3,
                     otlp_metrics=False),
        tmp_path / "spool")
    try:
        started = time.monotonic()
        for n in range(5):
            exporter.submit({**RECORD, "id": f"r{n}"})
            time.sleep(0.6)  # one batch each
        assert time.monotonic() - started < 5  # submit never waits for the collector
        assert wait_for(lambda: len(exporter.spool) == 3)
        assert exporter.counters()["export_dropped"] == 2  # the spool is bounded: the oldest went
        receiver = Receiver(port)
        try:
            assert wait_for(lambda: len(exporter.spool) == 0 and len(receiver.spans) == 3, timeout=15)
        finally:
            receiver.close()
    finally:
        exporter.close()
    assert sorted(attributes(s)["llmtap.record_id"] for _, s, _ in receiver.spans) == ["r2", "r3", "r4"]


def test_recorder_exports_written_records(tmp_path):
    receiver = Receiver()
    try:
        record_once(tmp_path, anthropic_flow(),
                    toml=f'[export]\notlp_endpoint = "http://127.0.0.1:{receiver.port}/v1/traces"\n')
        assert wait_for(lambda: receiver.spans)
    finally:
        receiver.close()
    assert attributes(receiver.spans[0][1])["gen_ai.request.model"] == "claude-sonnet-4-5"


def test_gzip_archive_is_real_gzip(tmp_path):
    make_records(tmp_path, 10, datetime.datetime(2025, 6, 1, tzinfo=datetime.UTC), 1)
    rotation.archive_oldest(tmp_path, 5)
    [first, *_] = sorted((tmp_path / "archive").glob("*.json.gz"))
    assert json.loads(gzip.decompress(first.read_bytes()))["id"] == "rec00000"
    assert len(rotation.live_records(tmp_path)) == 5


def test_records_written_by_a_writer_process_keep_their_files_index_and_counters(tmp_path):
    """The worker's writer runs in a process of its own; what the Recorder sees is the same."""
    from llmtap.addons import recorder as recorder_module

    config = tmp_path / "config.toml"
    config.write_text("")
    writer = recorder_module.start_writer_process(tmp_path, config, None)
    assert writer is not None
    flows = [anthropic_flow() for _ in range(5)]
    recorder = Recorder(process_writer=writer)
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, llmtap_records_dir=str(tmp_path), llmtap_config_file=str(config))
        assert recorder.writer is writer
        for flow in flows:
            recorder.response(flow)
        recorder.done()
    assert sorted(json.loads(p.read_text())["id"] for p in tmp_path.glob("*.json")) == sorted(
        f.id for f in flows)
    assert len(list(tmp_path.glob("*.md"))) == 5
    assert {row["id"] for row in Index.open_reader(tmp_path).calls()} == {f.id for f in flows}
    assert writer.counters()["records_written"] == 5
    assert writer.counters()["records_dropped"] == 0


def test_a_stalled_writer_process_never_blocks_the_event_loop_and_drops_only_beyond_the_queue(
        tmp_path):
    """The pipe to the writer fills; submit() and the batch flush must return at once, keep
    `queue_size` records waiting, count the rest as dropped, and hand the waiting ones over
    once the writer reads again."""
    import asyncio
    import os
    import signal

    from llmtap.addons.recorder import capture_exchange
    from llmtap.flow import build_record
    from llmtap.records.writer_process import BATCH_S, RecordWriterProcess

    writer = RecordWriterProcess(tmp_path, WriterSettings(RecordsConfig(queue_size=3)))
    flows = [anthropic_flow() for _ in range(12)]
    for flow in flows:  # ~600 KB each: a batch of three overfills the 1 MB pipe
        flow.response.content = json.dumps({"text": "x" * 600_000}).encode()

    async def submit_while_stalled() -> None:
        os.kill(writer._pid, signal.SIGSTOP)
        try:
            for flow in flows:
                writer.submit(build_record(flow), capture_exchange(flow, 1 << 20))
            assert writer.waiting() == 3
            assert writer.counters()["records_dropped"] == 9
            await asyncio.sleep(BATCH_S * 3)  # the batch went out as far as the pipe took it
            assert writer._waiting and writer.waiting() == 3
        finally:
            os.kill(writer._pid, signal.SIGCONT)
        for _ in range(500):  # the loop drains the rest as the pipe becomes writable
            if not writer.waiting():
                break
            await asyncio.sleep(0.01)
        assert writer.waiting() == 0

    asyncio.run(submit_while_stalled())
    writer.close()
    counters = writer.counters()
    assert len(list(tmp_path.glob("*.json"))) == counters["records_written"] == 3
    assert counters["records_dropped"] == 9


def test_record_json_is_the_standard_librarys_indented_text_and_falls_back_where_orjson_refuses():
    from llmtap.jsontext import parse, pretty

    record = {"id": "r1", "model": "claude-sonnet-4-5", "cost_usd": 0.0123, "usage": {"in": 10},
              "text": "é ✓ \u2028 <tag>", "rules_hit": [], "stream": True, "error": None}
    assert pretty(record) == json.dumps(record, indent=2, ensure_ascii=False)
    huge = {"n": 2**70}  # beyond orjson's 64-bit integers
    assert pretty(huge) == json.dumps(huge, indent=2, ensure_ascii=False)
    assert pretty({1: "a"}) == json.dumps({1: "a"}, indent=2, ensure_ascii=False)
    assert parse(pretty(record)) == record
    with pytest.raises(ValueError):
        parse("{not json")


def can_raise_limits() -> bool:
    """CAP_SYS_RESOURCE (bit 24): a normal root has it; some containers' root does not."""
    effective = next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                     if line.startswith("CapEff:"))
    return bool(int(effective, 16) >> 24 & 1)


@pytest.mark.parametrize("nice_limit,leaves_idle", [(20, True), (0, False)])
def test_the_record_writer_idles_and_takes_its_fair_share_only_when_starved(nice_limit,
                                                                           leaves_idle):
    """As the unprivileged worker's child: SCHED_IDLE; back to nice 0 when batches arrive late,
    which only RLIMIT_NICE (set by root before the drop) permits; idle again once caught up.
    Without RLIMIT_NICE it would be idle for good: it stays at nice 10 instead."""
    import os
    import resource

    from llmtap.records.writer_process import BackgroundPriority

    if nice_limit > resource.getrlimit(resource.RLIMIT_NICE)[1] and not can_raise_limits():
        pytest.skip("this root cannot raise RLIMIT_NICE (no CAP_SYS_RESOURCE in this container)")

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            resource.setrlimit(resource.RLIMIT_NICE, (nice_limit, nice_limit))
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            priority = BackgroundPriority()
            policies = [(os.sched_getscheduler(0), os.nice(0))]
            priority.adjust(5.0)  # a batch five seconds late: starved
            policies.append((os.sched_getscheduler(0), os.nice(0)))
            priority.adjust(0.1)
            policies.append((os.sched_getscheduler(0), os.nice(0)))
            idle, fair, fixed = (os.SCHED_IDLE, 0), (os.SCHED_OTHER, 0), (os.SCHED_OTHER, 10)
            expected = [idle, fair, idle] if leaves_idle else [fixed, fixed, fixed]
            code = 0 if policies == expected else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_killed_writer_process_is_replaced_and_loses_no_record(tmp_path, caplog):
    """Batches the writer process had taken but not written when it died, and everything after,
    are written by the writer thread that takes over."""
    import os
    import signal

    from llmtap.addons.recorder import capture_exchange
    from llmtap.flow import build_record
    from llmtap.records.writer_process import RecordWriterProcess

    writer = RecordWriterProcess(tmp_path, WriterSettings())
    flows = [anthropic_flow() for _ in range(6)]
    os.kill(writer._pid, signal.SIGSTOP)  # it takes nothing from the pipe: all stay unhandled
    for flow in flows[:4]:
        writer.submit(build_record(flow), capture_exchange(flow, 1 << 16))  # no loop: sent at once
    assert len(writer._sent) == 4 and writer.waiting() == 0
    os.kill(writer._pid, signal.SIGKILL)
    for _ in range(200):
        if writer.check():
            break
        time.sleep(0.01)
    assert writer.fallback is not None
    for flow in flows[4:]:
        writer.submit(build_record(flow), capture_exchange(flow, 1 << 16))
    writer.close()
    assert sorted(json.loads(p.read_text())["id"] for p in tmp_path.glob("*.json")) == sorted(
        f.id for f in flows)
    counters = writer.counters()
    assert counters["records_written"] == 6 and counters["records_dropped"] == 0
    assert counters["record_writer_restarts"] == 1
    assert "the record writer process died (killed by SIGKILL)" in caplog.text
    assert "4 not yet written were handed to it" in caplog.text


def test_a_client_gone_before_its_process_lookup_answers_still_gets_its_process(tmp_path):
    """A short-lived client (curl) may exit before the supervisor answers who it was: the record
    waits for the answer, and takes it from the lookup even though the connection is gone."""
    import asyncio
    import socket

    from llmtap.addons.attribution import Attribution

    ours, theirs = socket.socketpair()
    attribution = Attribution(channel=ours)
    recorder = Recorder(lookup=attribution)
    flow = anthropic_flow()
    flow.client_conn.peername = ("127.0.0.1", 40000)
    process = {"pid": 4242, "name": "curl", "exe": "/usr/bin/curl", "user": "root"}

    async def exchange() -> None:
        attribution.client_connected(flow.client_conn)
        attribution.requestheaders(flow)
        attribution.client_disconnected(flow.client_conn)  # curl exits: its waiting flows go
        recorder.response(flow)  # the lookup is still under way
        await asyncio.sleep(0.05)
        attribution._answer(flow.client_conn.id, process)  # then the supervisor answers
        await asyncio.sleep(0.05)

    with taddons.context(attribution, recorder) as tctx:
        tctx.configure(recorder, llmtap_records_dir=str(tmp_path))
        asyncio.run(exchange())
        recorder.done()
    theirs.close()
    [written] = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert written["process"] == process


def test_a_starved_writer_process_is_given_its_fair_share_by_the_worker(tmp_path):
    """Idle-scheduled on a machine busy with builds, the writer gets almost no CPU: not even
    enough to see it lags. The worker (normal priority, unprivileged, the same user) raises it
    once a batch has waited STARVED_S; the writer goes back to idle itself once caught up."""
    import os
    import resource
    import signal

    from llmtap.addons.recorder import capture_exchange
    from llmtap.flow import build_record
    from llmtap.records.writer_process import HANDLED, STARVED_S, RecordWriterProcess

    if resource.getrlimit(resource.RLIMIT_NICE)[1] < 20 and not can_raise_limits():
        pytest.skip("this root cannot raise RLIMIT_NICE (no CAP_SYS_RESOURCE in this container)")
    tmp_path.chmod(0o777)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            resource.setrlimit(resource.RLIMIT_NICE, (20, 20))  # as the supervisor sets it
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            writer = RecordWriterProcess(tmp_path, WriterSettings())
            for _ in range(200):  # it makes itself idle first thing
                if os.sched_getscheduler(writer._pid) == os.SCHED_IDLE:
                    break
                time.sleep(0.01)
            os.kill(writer._pid, signal.SIGSTOP)  # starved: it handles nothing
            flow = anthropic_flow()
            writer.submit(build_record(flow), capture_exchange(flow, 1 << 16))  # sent at once
            writer.counters()
            steps = [os.sched_getscheduler(writer._pid)]  # not late yet: left idle
            writer._sent[0].at -= STARVED_S + 1
            writer.counters()
            steps.append(os.sched_getscheduler(writer._pid))  # late: raised
            os.kill(writer._pid, signal.SIGCONT)
            for _ in range(500):
                if writer._shared[HANDLED] >= 1:
                    break
                time.sleep(0.01)
            flow = anthropic_flow()
            writer.submit(build_record(flow), capture_exchange(flow, 1 << 16))  # on time
            for _ in range(500):
                if writer._shared[HANDLED] >= 2:
                    break
                time.sleep(0.01)
            steps.append(os.sched_getscheduler(writer._pid))  # caught up: idle again
            writer.close()
            code = 0 if steps == [os.SCHED_IDLE, os.SCHED_OTHER, os.SCHED_IDLE] else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
