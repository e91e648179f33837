"""Records, attribution, history commands, OTLP export, the control socket and the dashboard,
end to end in the test bed (three daemon starts in all)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paths
import pytest
from testbed import LLMTAP, Daemon, Testbed

pytestmark = pytest.mark.root

DOCS = paths.DOCS
API_KEY = "sk-ant-api03-TESTKEYNEVERWRITTEN"
SYSTEM = "You are terse."
SPEC_FIELDS = ("id", "started_at", "ended_at", "host", "method", "path", "status", "provider", "api",
               "model", "stream", "request", "usage", "cost_usd", "stop_reason", "ttft_ms",
               "duration_ms", "chunks", "process", "credential", "rules_hit", "dlp_hits", "error")

RECEIVER = """
import http.server, json, sys
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
out = open(sys.argv[2], "a")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path != "/v1/traces":  # the gen_ai metrics: tests/e2e/test_exporters_e2e.py
            self.send_response(200)
            self.end_headers()
            return
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    attrs = {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes
                             if kv.value.WhichOneof("value") != "array_value"}
                    out.write(json.dumps({"name": span.name, "attributes": attrs}) + "\\n")
                    out.flush()
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("up", flush=True)
server.serve_forever()
"""

SDK_CLIENT = ("""
import json, os, sys, time, anthropic, openai
ca = sys.argv[1]
claude = anthropic.Anthropic(api_key="{key}", http_client=anthropic.DefaultHttpxClient(verify=ca),
                             max_retries=0)
gpt = openai.OpenAI(api_key="sk-proj-ALSONEVERWRITTEN", max_retries=0,
                    http_client=openai.DefaultHttpxClient(verify=ca))
messages = [{{"role": "user", "content": "hi"}}]
for _ in range(2):
    claude.messages.create(model="claude-sonnet-4-5", max_tokens=64, system="{system}",
                           messages=messages)
    with claude.messages.stream(model="claude-sonnet-4-5", max_tokens=64, system="{system}",
                                messages=messages) as stream:
        text = "".join(stream.text_stream)
    gpt.chat.completions.create(model="gpt-4.1", messages=messages)
    for _chunk in gpt.chat.completions.create(model="gpt-4.1", messages=messages, stream=True):
        pass
    time.sleep(0.2)
print(json.dumps({{"pid": os.getpid(), "text": text}}))
""").replace("{key}", API_KEY).replace("{system}", SYSTEM).replace("{{", "{").replace("}}", "}")

CONTROL_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("refused at connect:", exc.strerror)
    sys.exit(0)
answer = s.recv(4096).decode().strip()
try:
    s.sendall(b'{"cmd": "subscribe"}\\n')
    more = s.recv(4096)
except OSError:
    more = b""
print("answer:", answer, "then", repr(more))
"""


def wait_until(condition: Any, timeout: float = 15.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(every)
    return condition()


def free_port(testbed: Testbed) -> int:
    code = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
    return int(testbed.python(code).stdout)


def cli_json(daemon: Daemon, *args: str) -> Any:
    return json.loads(daemon.llmtap(*args).stdout)


def test_records_attribution_history_export_and_control_socket(testbed, llmtap):
    port = free_port(testbed)
    spans = Path(testbed.workdir) / "spans.jsonl"
    spans.write_text("")
    receiver = subprocess.Popen(["ip", "netns", "exec", testbed.client_ns, sys.executable, "-c",
                                 RECEIVER, str(port), str(spans)], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout and receiver.stdout.readline().strip() == "up"
        daemon = llmtap(extra_toml=f'[export]\notlp_endpoint = "http://127.0.0.1:{port}/v1/traces"\n')
        check_records_and_attribution(testbed, daemon)
        check_history_commands(daemon)
        names = wait_until(lambda: [json.loads(line) for line in spans.read_text().splitlines()]
                           if len(spans.read_text().splitlines()) >= 11 else None)
        assert names and len(names) == 11  # every exchange became a span
        sdk_span = next(s for s in names if s["attributes"].get("gen_ai.request.model") == "gpt-4.1")
        assert sdk_span["name"] == "chat gpt-4.1"
        assert sdk_span["attributes"]["gen_ai.provider.name"] == "openai"
        assert sdk_span["attributes"]["server.address"] == "api.openai.com"
        assert "gen_ai.usage.output_tokens" in sdk_span["attributes"]
        check_control_socket_refuses_others(daemon)
    finally:
        receiver.kill()


def check_records_and_attribution(testbed: Testbed, daemon: Daemon) -> None:
    """Two programs at once: an SDK script (python) and curl (IPv4 and IPv6)."""
    sdk = subprocess.Popen(["ip", "netns", "exec", testbed.client_ns, sys.executable, "-c",
                            SDK_CLIENT, str(daemon.ca_pem)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={"PATH": os.environ["PATH"]})
    for n in range(3):
        testbed.curl(f"https://api.anthropic.com/v1/models?from=curl{n}", daemon.ca_pem,
                     *(("-6",) if n == 2 else ()))
    out, err = sdk.communicate(timeout=60)
    assert sdk.returncode == 0, err
    python = json.loads(out)
    records = daemon.records(expected=11)
    assert len(records) == 11
    by_client = {"curl": [r for r in records if "from=curl" in r["path"]],
                 "sdk": [r for r in records if "from=curl" not in r["path"]]}
    assert len(by_client["curl"]) == 3 and len(by_client["sdk"]) == 8
    for record in by_client["curl"]:
        assert record["process"]["name"] == "curl", record["process"]
        assert record["process"]["exe"] == shutil.which("curl") or record["process"]["exe"].endswith("curl")
        assert record["process"]["user"] == "root"
    for record in by_client["sdk"]:
        assert record["process"]["pid"] == python["pid"], record["process"]
        assert record["process"]["exe"] == os.path.realpath(sys.executable)
        assert record["process"]["tool"] == "python"
    for record in records:
        for key in SPEC_FIELDS:
            assert key in record, key
        assert record["started_at"].endswith("Z") and record["ended_at"].endswith("Z")
        assert record["status"] == 200 and record["duration_ms"] > 0
    streamed = [r for r in by_client["sdk"] if r["stream"]]
    assert len(streamed) == 4  # each SDK's streamed call, twice
    check_files(daemon, records)


def check_files(daemon: Daemon, records: list[dict[str, Any]]) -> None:
    directory = daemon.records_dir
    for record in records:
        [path] = directory.glob(f"*_{record['id']}.json")
        assert path.name.split("_")[0] == record["started_at"].replace(":", "").replace("-", "")
        assert path.with_suffix(".md").exists()
    everything = "".join(p.read_text(errors="replace") for p in directory.rglob("*")
                         if p.is_file() and p.suffix in (".json", ".md", ".txt"))
    assert "TESTKEYNEVERWRITTEN" not in everything and "ALSONEVERWRITTEN" not in everything
    prompts = list((directory / "system").iterdir())
    assert [p.read_text() for p in prompts] == [SYSTEM]  # once, for four calls
    streamed = next(r for r in records if r["stream"] and r["host"] == "api.anthropic.com")
    twin = next(directory.glob(f"*_{streamed['id']}.md")).read_text()
    assert "Hello from the fake upstream." in twin, twin
    assert "authorization: bearer ••••" in twin.lower() or "x-api-key: ••••" in twin.lower()
    assert streamed["system_prompt"] == f"system/{prompts[0].name}"


def check_history_commands(daemon: Daemon) -> None:
    lines = daemon.llmtap("logs", "--json").stdout.splitlines()
    assert len(lines) == 11
    assert len(daemon.llmtap("logs", "--process", "curl").stdout.splitlines()) == 3
    stats = cli_json(daemon, "stats", "--by", "process", "--json", "--since", "1h")
    calls = {g["key"]: g["calls"] for g in stats["groups"]}
    assert calls == {"python": 8}  # curl only listed the models: no call
    assert stats["not_counted"] == 3
    by_model = cli_json(daemon, "stats", "--by", "model", "--json")
    assert {g["key"] for g in by_model["groups"]} >= {"claude-sonnet-4-5", "gpt-4.1"}
    first = json.loads(lines[0])
    shown = daemon.llmtap("show", first["id"][:8]).stdout
    assert "## Request" in shown and "## Response" in shown
    assert json.loads(daemon.llmtap("show", first["id"], "--json").stdout)["id"] == first["id"]
    csv_lines = daemon.llmtap("export", "--format", "csv").stdout.splitlines()
    assert len(csv_lines) == 12 and csv_lines[0].startswith("id,")
    counters = wait_until(lambda: (c := daemon.status()["counters"]).get("export_spans") and c)
    assert counters["records_written"] == 11 and counters["records_dropped"] == 0
    assert daemon.llmtap("reindex").stdout.strip().startswith("indexed 11 records")
    testbed_curl_after_reindex = daemon.llmtap("logs", "-n", "0").stdout.splitlines()
    assert len(testbed_curl_after_reindex) == 11


def check_control_socket_refuses_others(daemon: Daemon) -> None:
    socket_path = daemon.root / "run" / "control.sock"
    as_nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                 "/usr/bin/python3", "-c", CONTROL_CLIENT, str(socket_path)]
    first = subprocess.run(as_nobody, capture_output=True, text=True, timeout=20)
    assert first.stdout.strip() == "refused at connect: Permission denied", first.stderr
    socket_path.chmod(0o666)  # even when the file lets anyone in, SO_PEERCRED does not
    try:
        second = subprocess.run(as_nobody, capture_output=True, text=True, timeout=20)
    finally:
        socket_path.chmod(0o660)
    assert second.stdout.strip() == "answer: {\"error\": \"permission denied\"} then b''", second.stderr


def test_full_records_disk_does_not_break_relaying(testbed, llmtap):
    daemon = llmtap()
    status = daemon.status()
    target = str(daemon.records_dir)
    in_daemon = ["nsenter", "-t", str(status["pid"]), "-m"]
    owner = daemon.records_dir.stat()
    subprocess.run([*in_daemon, "mount", "-t", "tmpfs", "-o",
                    f"size=24k,mode=0750,uid={owner.st_uid},gid={owner.st_gid}", "tmpfs", target],
                   check=True)
    try:
        started = time.monotonic()
        for n in range(25):
            result = testbed.curl(f"https://api.openai.com/full/{n}", daemon.ca_pem)
            assert json.loads(result.stdout)["path"] == f"/full/{n}"
        elapsed = time.monotonic() - started
        counters = wait_until(lambda: (c := daemon.status()["counters"])["records_dropped"] and
                              c["records_written"] + c["records_dropped"] == 25 and c)
        assert counters and counters["records_dropped"] >= 10, counters
        assert "not written" in daemon.stderr()
        assert elapsed < 20
    finally:
        subprocess.run([*in_daemon, "umount", target], check=False)
    assert "tmpfs" not in subprocess.run([*in_daemon, "findmnt", "-n", target], capture_output=True,
                                         text=True).stdout
    testbed.curl("https://api.openai.com/after-full", daemon.ca_pem)  # and it records again
    assert wait_until(lambda: daemon.status()["counters"]["records_written"] > counters["records_written"])


class Tmux:
    def __init__(self, name: str) -> None:
        self.base = ["tmux", "-L", name]

    def start(self, command: list[str]) -> None:
        subprocess.run([*self.base, "new-session", "-d", "-s", "dash", "-x", "150", "-y", "42",
                        " ".join(command)], check=True, env={**os.environ, "TERM": "xterm-256color"})

    def screen(self) -> str:
        return subprocess.run([*self.base, "capture-pane", "-p", "-t", "dash"], capture_output=True,
                              text=True).stdout

    def wait_for(self, *texts: str, timeout: float = 20) -> str:
        def shown() -> str | None:
            screen = self.screen()
            return screen if all(text in screen for text in texts) else None

        screen = wait_until(shown, timeout=timeout, every=0.25)
        assert screen, f"{texts} not on the dashboard:\n{self.screen()}"
        return str(screen)

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


def test_dashboard_in_tmux(testbed, llmtap):
    if not shutil.which("tmux"):
        pytest.skip("needs tmux (scripts/test.sh installs it)")
    # max_files = 1: the worker rotates its records as they come (archive/ while it runs).
    daemon = llmtap(extra_toml="[dashboard]\ndaily_budget_usd = 0.0005\nbell = true\n"
                               "[records]\nmax_files = 1\n")
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64,
                       "messages": [{"role": "user", "content": "hi"}]})
    testbed.curl("https://api.anthropic.com/v1/messages", daemon.ca_pem,
                 "-H", "content-type: application/json", "-d", body)
    [priced] = daemon.records(expected=1)
    tmux = Tmux(f"llmtap-{os.getpid()}")
    try:
        tmux.start([LLMTAP, "dashboard", "--config", str(daemon.config_path)])
        tmux.wait_for("llmtap · live", "Latest calls", "claude-sonnet-4-5")
        # 15 s of chunks: on a busy machine the panel may take a while to show it with its process.
        slow = subprocess.Popen(["ip", "netns", "exec", testbed.client_ns, "curl", "-sS", "-N",
                                 "--cacert", str(daemon.ca_pem), "-d", '{"stream": true}',
                                 "https://api.anthropic.com/v1/messages?bench=stream&n=150&gap_ms=100"],
                                stdout=subprocess.DEVNULL)
        try:
            screen = tmux.wait_for("Active requests (1)", "curl[", "/v1/messages", "chunks")
            time.sleep(1.0)
            screen = tmux.screen()
            if os.environ.get("LLMTAP_SAVE_SCREENSHOT"):  # refreshes the one in docs/
                (DOCS / "dashboard-screenshot.txt").write_text(screen)
        finally:
            slow.wait(timeout=45)
        after = tmux.wait_for("no requests in flight", "calls")
        assert "Cost per process" in after and "Context window" in after
        if priced.get("cost_usd") is not None:  # pricing priced it: the tiny budget is blown
            assert "budget alert" in after
        # The writer rotates after it writes, on its own time: on a busy machine, later.
        rotated = wait_until(lambda: list((daemon.records_dir / "archive").glob(f"*_{priced['id']}.json.gz"))
                             and len(list(daemon.records_dir.glob("*.json"))) == 1)
        assert rotated, sorted(p.name for p in daemon.records_dir.rglob("*"))
        shown = json.loads(daemon.llmtap("show", priced["id"], "--json").stdout)
        assert shown["id"] == priced["id"]  # found in the archive through the index
        daemon.stop()
        tmux.wait_for("daemon not running", "history from the index")
    finally:
        tmux.kill()
    assert "claude-sonnet-4-5" in screen and "─" in screen


def test_dashboard_once_and_read_only_without_daemon(tmp_path):
    """No daemon at all: the history is read from the files (no extra daemon start)."""
    records = tmp_path / "records"
    records.mkdir()
    record = {"id": "0badc0de-1", "started_at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
              "model": "gpt-4.1", "host": "api.openai.com", "status": 200,
              "usage": {"input_tokens": 1000, "output_tokens": 50}, "cost_usd": 0.0025,
              "process": {"pid": 1, "name": "codex", "tool": "codex"}}
    (records / "x_gpt-4.1_0badc0de-1.json").write_text(json.dumps(record))
    config = tmp_path / "config.toml"
    config.write_text(f'records_dir = "{records}"\nrun_dir = "{tmp_path / "run"}"\n')
    result = subprocess.run([LLMTAP, "dashboard", "--once", "--read-only", "--config", str(config)],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "140"})
    assert result.returncode == 0, result.stderr
    assert "daemon not running · history from the files" in result.stdout
    assert "codex" in result.stdout and "gpt-4.1" in result.stdout
    assert sorted(p.name for p in records.iterdir()) == ["x_gpt-4.1_0badc0de-1.json"]

