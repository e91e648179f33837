"""The team view end to end: a real Prometheus (Debian's `prometheus`) scrapes the daemon's
/metrics in the test bed's client namespace, and PromQL over its HTTP API returns the totals of
the calls the test made; /health answers for load balancers.

The exporters (OTLP, Loki, ClickHouse) are in tests/e2e/test_exporters_e2e.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_protocols_e2e import client, cost, records
from testbed import Daemon, Testbed, make_workdir, running_daemon

pytestmark = pytest.mark.root

METRICS = "127.0.0.1:9464"
PROMETHEUS = "127.0.0.1:19090"
TOKEN = "team-view-scrape-token-0123456789"
SONNET = cost(input=(472, "3"), output=(189, "15"), read=(10240, "0.30"), w5m=(1536, "3.75"),
              w1h=(512, "6"))
HAIKU = cost(input=(2095, "1"), output=(503, "5"), read=(3000, "0.10"), w1h=(1000, "2"))


@pytest.fixture(scope="module")
def tap(testbed: Testbed) -> Iterator[Daemon]:
    with running_daemon(testbed, f"""
        [metrics]
        listen = "{METRICS}"
        bearer_token = "{TOKEN}"
    """) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def prometheus(testbed: Testbed, tap: Daemon) -> Iterator[str]:
    """Prometheus in the client namespace, scraping the daemon every second with the token."""
    if not shutil.which("prometheus"):
        pytest.skip("needs prometheus (the README's test command installs it)")
    work = make_workdir()
    (work / "token").write_text(TOKEN)
    (work / "prometheus.yml").write_text(textwrap.dedent(f"""
        global: {{scrape_interval: 1s, evaluation_interval: 1s}}
        scrape_configs:
          - job_name: llmtap
            authorization: {{credentials_file: {work / "token"}}}
            static_configs: [{{targets: ["{METRICS}"]}}]
    """))
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - Prometheus keeps writing to it
    proc = subprocess.Popen(
        ["ip", "netns", "exec", testbed.client_ns, "prometheus",
         f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address={PROMETHEUS}"], stdout=log, stderr=log)
    try:
        wait_for(lambda: _up(testbed), 60, "prometheus to scrape llmtap", work / "prometheus.log")
        yield PROMETHEUS
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def wait_for(check: Any, timeout: float, what: str, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    raise AssertionError(f"no {what} in {timeout}s" + (f": {log.read_text()[-3000:]}" if log else ""))


def curl(testbed: Testbed, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return testbed.client("curl", "-sS", "--max-time", "10", *args, url, check=False)


def query(testbed: Testbed, promql: str) -> dict[str, float]:
    """An instant PromQL query: each series' labels (as JSON) -> value."""
    url = f"http://{PROMETHEUS}/api/v1/query?query={urllib.parse.quote(promql)}"
    answer = json.loads(curl(testbed, url).stdout or "{}")
    assert answer.get("status") == "success", answer
    return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1])
            for r in answer["data"]["result"]}


def scalar(testbed: Testbed, promql: str) -> float | None:
    values = list(query(testbed, promql).values())
    return values[0] if values else None


def _up(testbed: Testbed) -> bool:
    try:
        return scalar(testbed, 'up{job="llmtap"}') == 1
    except (AssertionError, ValueError):
        return False


def make_calls(testbed: Testbed, daemon: Daemon, tag: str, sonnet: int, haiku: int) -> None:
    client(testbed, daemon, f"""
        out = []
        for i in range({sonnet}):
            out.append(fetch("https://api.anthropic.com/v1/messages?t={tag}",
                             {{"model": "claude-sonnet-4-5", "stream": True}},
                             {{"x-fake-fixture": "anthropic_messages_stream.sse",
                               "x-fake-pause-ms": str(5 + 5 * i)}})["status"])
        for i in range({haiku}):
            out.append(fetch("https://api.anthropic.com/v1/messages?t={tag}",
                             {{"model": "claude-haiku-4-5"}},
                             {{"x-fake-fixture": "anthropic_message.json"}})["status"])
        # no call: a token count is recorded `counted: false`, and no metric counts it
        out.append(fetch("https://api.anthropic.com/v1/messages/count_tokens?t={tag}",
                         {{"model": "claude-haiku-4-5"}})["status"])
        print(json.dumps(out))
    """)
    written = records(daemon, tag, sonnet + haiku + 1)
    assert [r.get("counted") for r in written].count(False) == 1


def test_prometheus_scrapes_the_totals_of_the_calls(testbed, tap, prometheus):
    make_calls(testbed, tap, "prom", sonnet=6, haiku=4)
    total = wait_for(lambda: scalar(testbed, "sum(llmtap_requests_total)") == 10 or None, 20,
                     "10 requests in Prometheus")
    assert total
    by_model = query(testbed, 'sum by (model) (llmtap_requests_total{code="200"})')
    assert by_model == {'{"model": "claude-haiku-4-5-20251001"}': 4,
                        '{"model": "claude-sonnet-4-5-20250929"}': 6}
    tokens = {json.loads(k)["kind"]: v for k, v in
              query(testbed, "sum by (kind) (llmtap_tokens_total)").items()}
    assert tokens == {"input": 6 * 472 + 4 * 2095, "output": 6 * 189 + 4 * 503,
                      "cache_read": 6 * 10240 + 4 * 3000, "cache_write_5m": 6 * 1536,
                      "cache_write_1h": 6 * 512 + 4 * 1000}
    assert scalar(testbed, "sum(llmtap_cost_usd_total)") == pytest.approx(6 * SONNET + 4 * HAIKU)
    # Latency percentiles come out of the histograms: streamed calls take 0.5-1.5 s here.
    quantiles = [scalar(testbed, f"histogram_quantile({q}, sum by (le) "
                        f'(llmtap_request_duration_seconds_bucket{{model=~"claude-sonnet.*"}}))')
                 for q in (0.5, 0.95, 0.99)]
    assert all(q is not None for q in quantiles), quantiles
    assert 0.25 < quantiles[0] <= quantiles[1] <= quantiles[2] <= 5, quantiles
    ttft_p95 = scalar(testbed, "histogram_quantile(0.95, sum by (le) "
                      "(llmtap_time_to_first_token_seconds_bucket))")
    assert ttft_p95 is not None and 0 < ttft_p95 < quantiles[1]
    assert scalar(testbed, "sum(llmtap_time_to_first_token_seconds_count)") == 10  # JSON too
    assert scalar(testbed, "llmtap_intercepting") == 1
    assert wait_for(lambda: scalar(testbed, "llmtap_records_written_total") == 11 or None, 10,
                    "records written")


def test_metrics_follow_the_prometheus_conventions_and_need_the_token(testbed, tap):
    url = f"http://{METRICS}/metrics"
    assert curl(testbed, url, "-o", "/dev/null", "-w", "%{http_code}").stdout == "401"
    wrong = curl(testbed, url, "-H", "Authorization: Bearer nope", "-o", "/dev/null",
                 "-w", "%{http_code}")
    assert wrong.stdout == "401"
    text = curl(testbed, url, "-H", f"Authorization: Bearer {TOKEN}").stdout
    assert "# TYPE llmtap_request_duration_seconds histogram" in text
    if shutil.which("promtool"):  # Prometheus' own linter of names, units and suffixes
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                              capture_output=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr


def test_health_says_intercepting_and_503_while_the_worker_is_replaced(testbed, tap):
    url = f"http://{METRICS}/health"
    auth = ("-H", f"Authorization: Bearer {TOKEN}")
    ok = curl(testbed, url, *auth, "-w", "\n%{http_code}").stdout.splitlines()
    assert ok[-1] == "200" and json.loads(ok[0])["status"] == "intercepting"
    worker = tap.status()["worker_pid"]
    watcher = subprocess.Popen(  # polls /health every 50 ms meanwhile: the gap may be short
        ["ip", "netns", "exec", testbed.client_ns, "python3", "-c", HEALTH_WATCH, url, TOKEN],
        stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    subprocess.run(["kill", "-STOP", str(worker)], check=True)  # hung: the watchdog replaces it
    try:
        seen = [json.loads(line) for line in watcher.communicate(timeout=30)[0].splitlines()]
    finally:
        subprocess.run(["kill", "-KILL", str(worker)], check=False)
    codes = [code for code, _ in seen]
    assert codes[0] == 200 and codes[-1] == 200 and 503 in codes, codes
    assert {state["status"] for code, state in seen if code == 503} <= {"healing", "down",
                                                                        "starting"}
    tap.wait_ready()
    metrics = curl(testbed, f"http://{METRICS}/metrics", *auth).stdout
    lines = metrics.splitlines()
    assert "llmtap_restarts_total 1" in lines
    # The totals are the supervisor's: they outlive the worker that counted them.
    assert "llmtap_records_written_total 11" in lines
    assert sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("llmtap_requests_total{")) == 10


HEALTH_WATCH = """
import json, sys, time, urllib.error, urllib.request
url, token = sys.argv[1:]
seen, start = [], time.monotonic()
while time.monotonic() - start < 20:
    request = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
    try:
        with urllib.request.urlopen(request, timeout=2) as r:
            code, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        code, body = e.code, e.read()
    except OSError:
        code, body = 0, b"{}"
    if not seen or seen[-1][0] != code:
        seen.append((code, json.loads(body)))
    if code == 200 and len(seen) > 2:
        break
    time.sleep(0.05)
for item in seen:
    print(json.dumps(item))
"""
