"""The remote stores end to end, in the test bed's client namespace with the daemon:

- a real ClickHouse server (Debian's `clickhouse-server`, 18.16) over its HTTP interface;
- Loki: no Grafana Loki can be installed here (Debian's `loki` is an unrelated genetics tool),
  so LOKI below is a receiver that decodes Loki's documented push API (POST /loki/api/v1/push,
  JSON body, gzip Content-Encoding) and refuses anything else with a 400;
- an OTLP/HTTP receiver decoding the traces and the gen_ai.client.* metrics.

Then both stores go away for a minute (Loki down, ClickHouse stopped mid-request, so slow) under
streaming load: no chunk is delayed, and every exchange arrives once they are back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_credentials_e2e import real_key, set_secret
from test_protocols_e2e import client, cost, records
from testbed import Daemon, Testbed, make_workdir, running_daemon

pytestmark = pytest.mark.root

CLICKHOUSE, LOKI_PORT, OTLP_PORT = "127.0.0.1:18123", 13100, 14318
CH_USER, CH_PASSWORD = "llmtap", "team-secret-pw"
SONNET = cost(input=(472, "3"), output=(189, "15"), read=(10240, "0.30"), w5m=(1536, "3.75"),
              w1h=(512, "6"))

LOKI = """
import gzip, http.server, json, sys
out = open(sys.argv[2], "a")
def valid(body):
    assert set(body) == {"streams"} and body["streams"]
    for stream in body["streams"]:
        assert set(stream) == {"stream", "values"}
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in stream["stream"].items())
        for ts, line in stream["values"]:
            assert isinstance(ts, str) and ts.isdigit() and isinstance(line, str)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        try:
            assert self.path == "/loki/api/v1/push", self.path
            assert self.headers["content-type"] == "application/json"
            assert self.headers["content-encoding"] == "gzip"
            body = json.loads(gzip.decompress(self.rfile.read(int(self.headers["content-length"]))))
            valid(body)
        except Exception as exc:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(repr(exc).encode())
            return
        for stream in body["streams"]:
            for ts, line in stream["values"]:
                out.write(json.dumps({"labels": stream["stream"], "ts": ts, "line": line,
                                      "tenant": self.headers["x-scope-orgid"]}) + "\\n")
        out.flush()
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("up", flush=True)
server.serve_forever()
"""

OTLP = """
import http.server, json, sys
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
out = open(sys.argv[2], "a")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/metrics":
            for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        for p in m.histogram.data_points:
                            attrs = {kv.key: kv.value.string_value for kv in p.attributes}
                            out.write(json.dumps({"metric": m.name, "sum": p.sum,
                                                  "count": p.count, "attrs": attrs}) + "\\n")
        else:
            for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        out.write(json.dumps({"span": span.name}) + "\\n")
        out.flush()
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("up", flush=True)
server.serve_forever()
"""

CH_CONFIG = """<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><console>1</console></logger>
    <http_port>{http}</http_port>
    <tcp_port>19000</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <path>{work}/data/</path>
    <tmp_path>{work}/tmp/</tmp_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>5368709</mark_cache_size>
</yandex>
"""
CH_USERS = """<?xml version="1.0"?>
<yandex>
    <profiles><default></default></profiles>
    <users><{user}><password>{password}</password><networks><ip>127.0.0.1</ip></networks>
        <profile>default</profile><quota>default</quota></{user}></users>
    <quotas><default></default></quotas>
</yandex>
"""


class Stores:
    """The three stores in the client namespace, each a process the test can stop."""

    def __init__(self, testbed: Testbed) -> None:
        self.testbed = testbed
        self.work = make_workdir()
        self.loki_out = self.work / "loki.jsonl"
        self.otlp_out = self.work / "otlp.jsonl"
        self.loki_out.write_text("")
        self.otlp_out.write_text("")
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start_receiver(self, name: str, script: str, port: int, out: Path) -> None:
        proc = subprocess.Popen(["ip", "netns", "exec", self.testbed.client_ns, sys.executable,
                                 "-c", script, str(port), str(out)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout and proc.stdout.readline().strip() == "up"
        self.procs[name] = proc

    def start_clickhouse(self) -> None:
        (self.work / "config.xml").write_text(CH_CONFIG.format(http=CLICKHOUSE.split(":")[1],
                                                               work=self.work))
        (self.work / "users.xml").write_text(CH_USERS.format(user=CH_USER, password=CH_PASSWORD))
        log = open(self.work / "clickhouse.log", "w")  # noqa: SIM115 - the server keeps writing
        self.procs["clickhouse"] = subprocess.Popen(
            ["ip", "netns", "exec", self.testbed.client_ns, "/usr/sbin/clickhouse-server",
             f"--config-file={self.work / 'config.xml'}"], stdout=log, stderr=log, text=True)
        deadline = time.monotonic() + 60
        while self.sql("SELECT 1").strip() != "1":
            assert time.monotonic() < deadline, (self.work / "clickhouse.log").read_text()[-2000:]
            time.sleep(0.5)

    def sql(self, query: str) -> str:
        url = f"http://{CLICKHOUSE}/?query={urllib.parse.quote(query)}"
        return self.testbed.client("curl", "-sS", "--max-time", "10", "-u",
                                   f"{CH_USER}:{CH_PASSWORD}", url, check=False).stdout

    def rows(self, query: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.sql(query + " FORMAT JSONEachRow").splitlines()]

    def loki(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.loki_out.read_text().splitlines()]

    def otlp(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.otlp_out.read_text().splitlines()]

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(timeout=20)

    def close(self) -> None:
        for name in list(self.procs):
            os.kill(self.procs[name].pid, signal.SIGCONT)
            self.stop(name)
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture(scope="module")
def stores(testbed: Testbed) -> Iterator[Stores]:
    if not Path("/usr/sbin/clickhouse-server").exists():
        pytest.skip("needs clickhouse-server (the README's test command installs it)")
    found = Stores(testbed)
    try:
        found.start_clickhouse()
        found.start_receiver("loki", LOKI, LOKI_PORT, found.loki_out)
        found.start_receiver("otlp", OTLP, OTLP_PORT, found.otlp_out)
        yield found
    finally:
        found.close()


@pytest.fixture(scope="module")
def tap(testbed: Testbed, stores: Stores) -> Iterator[Daemon]:
    with running_daemon(testbed, f"""
        [export]
        otlp_endpoint = "http://127.0.0.1:{OTLP_PORT}/v1/traces"
        [export.loki]
        url = "http://127.0.0.1:{LOKI_PORT}"
        tenant = "team-a"
        [export.clickhouse]
        url = "http://{CLICKHOUSE}"
        user = "{CH_USER}"
        password = "{CH_PASSWORD}"
        bodies = true
    """) as daemon:
        yield daemon


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    raise AssertionError(f"no {what} in {timeout}s")


def exp_rows(stores: Stores, tag: str, what: str, tail: str = "") -> list[dict[str, Any]]:
    return stores.rows(f"SELECT {what} FROM llmtap.exchanges WHERE path LIKE '%t={tag}%' {tail}")


def distinct_ids(stores: Stores, tag: str) -> int:
    found = exp_rows(stores, tag, "count(DISTINCT id) AS n")
    return int(found[0]["n"]) if found else -1


def tagged(entries: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    return [e for e in entries if f"t={tag}" in json.loads(e["line"])["path"]]


def test_every_store_gets_every_exchange_and_never_a_secret(testbed, tap, stores):
    key = real_key("sk-ant-api03-")
    placeholder = set_secret(tap, "anthropic", key, "--host", "api.anthropic.com")
    client(testbed, tap, f"""
        url = "https://api.anthropic.com/v1/messages?t=exp"
        for i in range(3):
            fetch(url, {{"model": "claude-sonnet-4-5", "stream": True}},
                  {{"x-fake-fixture": "anthropic_messages_stream.sse", "x-fake-pause-ms": "2"}})
        for i in range(2):
            fetch(url, {{"model": "claude-haiku-4-5", "messages": [{{"role": "user",
                  "content": "Weather in Paris?"}}]}}, {{"x-fake-fixture": "anthropic_message.json"}})
        fetch(url, {{"model": "claude-haiku-4-5", "messages": [{{"role": "user",
              "content": "my key is {key}"}}]}},
              {{"x-fake-fixture": "anthropic_message.json", "x-api-key": "{placeholder}"}})
        print("[]")
    """)
    written = records(tap, "exp", 6)
    assert len(written) == 6
    wait_for(lambda: distinct_ids(stores, "exp") == 6, 30, "6 rows in ClickHouse")
    by_model = exp_rows(stores, "exp", "model, count() AS calls, sum(output_tokens) AS output, "
                        "sum(cost_usd) AS cost, sum(length(request_body) > 0) AS bodies",
                        "GROUP BY model ORDER BY model")
    assert [(r["model"], int(r["calls"]), int(r["output"]), int(r["bodies"])) for r in by_model] == [
        ("claude-haiku-4-5-20251001", 3, 3 * 503, 3), ("claude-sonnet-4-5-20250929", 3, 3 * 189, 3)]
    assert by_model[1]["cost"] == pytest.approx(3 * SONNET)
    [injected] = exp_rows(stores, "exp", "credential, request_body", "AND credential != ''")
    assert injected["credential"] == "anthropic" and "my key is" in injected["request_body"]
    entries = wait_for(lambda: len(tagged(stores.loki(), "exp")) == 6 and tagged(stores.loki(), "exp"),
                       30, "6 Loki lines")
    assert {e["tenant"] for e in entries} == {"team-a"}
    assert all(set(e["labels"]) == {"host", "user", "provider", "model", "tool"} for e in entries)
    assert {json.loads(e["line"])["id"] for e in entries} == {r["id"] for r in written}
    assert {e["labels"]["provider"] for e in entries} == {"anthropic"}
    metrics = wait_for(lambda: [m for m in stores.otlp() if m.get("metric")], 30, "OTLP metrics")
    output = sum(m["sum"] for m in metrics if m["metric"] == "gen_ai.client.token.usage"
                 and m["attrs"]["gen_ai.token.type"] == "output")
    assert output == 3 * 503 + 3 * 189
    assert sum(1 for s in stores.otlp() if s.get("span", "").startswith("chat claude")) == 6
    # Every held secret is masked: no store ever saw the real key, bodies included.
    dump = stores.sql("SELECT * FROM llmtap.exchanges FORMAT JSONEachRow")
    assert "my key is" in dump and key not in dump
    assert key not in stores.loki_out.read_text() and key not in stores.otlp_out.read_text()


OUTAGE_CLIENT = """
import sys
calls, worst, started = 0, 0.0, time.monotonic()
while time.monotonic() - started < float(sys.argv[1]):
    got = fetch("https://api.anthropic.com/v1/messages?t=outage",
                {"model": "claude-sonnet-4-5", "stream": True},
                {"x-fake-fixture": "anthropic_messages_stream.sse", "x-fake-pause-ms": "5"})
    assert got["status"] == 200
    gaps = [b - a for a, b in zip(got["times"], got["times"][1:])]
    worst = max([worst, got["times"][0], *gaps])
    calls += 1
print(json.dumps({"calls": calls, "worst_gap_s": worst}))
"""


def test_a_minute_without_the_stores_delays_no_chunk_and_loses_nothing(testbed, tap, stores):
    from test_protocols_e2e import CLIENT

    stores.stop("loki")  # down: connections refused
    clickhouse = stores.procs["clickhouse"].pid
    os.kill(clickhouse, signal.SIGSTOP)  # slow: connections accepted, never answered
    try:
        out = testbed.client(sys.executable, "-c", CLIENT + textwrap.dedent(OUTAGE_CLIENT), "60",
                             env={"LLMTAP_CA": str(tap.ca_pem)}, timeout=150)
        during = tap.status()["counters"]
    finally:
        os.kill(clickhouse, signal.SIGCONT)
        stores.start_receiver("loki", LOKI, LOKI_PORT, stores.loki_out)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"a minute without the stores: {result}, counters then: {during}")  # shown with -s
    calls = result["calls"]
    assert calls > 30
    # ~90 chunks 5 ms apart upstream: none waited on a store (a 5 s ClickHouse timeout would show).
    assert result["worst_gap_s"] < 0.5, result
    assert during["export_spooled"] > 0  # the batches waited on disk
    assert len(records(tap, "outage", calls)) == calls
    wait_for(lambda: distinct_ids(stores, "outage") == calls, 120, f"{calls} rows in ClickHouse")
    wait_for(lambda: len(tagged(stores.loki(), "outage")) == calls, 120, f"{calls} Loki lines")
    counters = wait_for(lambda: (c := tap.status()["counters"])["export_spooled"] == 0 and c, 60,
                        "an empty spool")
    assert counters["export_dropped"] == 0 and counters["export_clickhouse_dropped"] == 0
    assert counters["export_loki_sent"] >= calls
