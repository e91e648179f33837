"""The supervisor's Prometheus metrics, its /metrics and /health server, and [metrics] config."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from llmtap import metrics
from llmtap.config import load_config
from llmtap.errors import UsageError
from llmtap.metrics import Metrics
from llmtap.metrics_server import MetricsServer

STATE = {"intercepting": True, "healing": False, "restarts": 2, "active": 1, "started": 1.5e9}


def end(**fields: Any) -> dict[str, Any]:
    event = {"type": "end", "provider": "anthropic", "model": "claude-x", "status": 200,
             "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_tokens": 100,
                       "reasoning_tokens": None},
             "cost_usd": 0.25, "ttft_ms": 150.0, "duration_ms": 1200.0,
             "process": {"name": "node", "tool": "claude-code", "user": "alice"}}
    return {**event, **fields}


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_calls_tokens_cost_and_histograms_from_end_events():
    m = Metrics()
    m.observe([end(), end(cost_usd=None, ttft_ms=None, status=429, error="http 429"),
               {"type": "start", "model": "ignored"}])
    got = samples(m.render(lambda: STATE))
    call = 'provider="anthropic",model="claude-x",tool="claude-code",user="alice"'
    assert got[f'llmtap_requests_total{{{call},code="200"}}'] == 1
    assert got[f'llmtap_requests_total{{{call},code="429"}}'] == 1
    assert got[f'llmtap_tokens_total{{{call},kind="cache_read"}}'] == 200
    assert f'llmtap_tokens_total{{{call},kind="reasoning"}}' not in got  # null: not a zero
    assert got[f"llmtap_cost_usd_total{{{call}}}"] == 0.25
    assert got['llmtap_unpriced_requests_total{provider="anthropic",model="claude-x"}'] == 1
    assert got['llmtap_errors_total{provider="anthropic",model="claude-x"}'] == 1
    ttft = 'llmtap_time_to_first_token_seconds_bucket{provider="anthropic",model="claude-x",'
    assert got[ttft + 'le="0.1"}'] == 0 and got[ttft + 'le="0.2"}'] == 1
    assert got[ttft + 'le="+Inf"}'] == 1
    duration = 'llmtap_request_duration_seconds_{}{{provider="anthropic",model="claude-x"}}'
    assert got[duration.format("count")] == 2 and got[duration.format("sum")] == 2.4
    assert got["llmtap_restarts_total"] == 2 and got["llmtap_intercepting"] == 1


def test_blocks_injections_and_calls_that_are_not_billed():
    m = Metrics()
    m.observe([end(credential="anthropic"), end(credential="anthropic", blocked="credentials",
                                                 error="llmtap blocked this request"),
               end(blocked="dlp"), end(counted=False, model="models-list")])
    got = samples(m.render(lambda: STATE))
    assert got['llmtap_injections_total{credential="anthropic"}'] == 1
    assert got['llmtap_blocks_total{stage="credentials"}'] == 1
    assert got['llmtap_blocks_total{stage="dlp"}'] == 1
    assert not any('model="models-list"' in key for key in got)  # counted: false is no call


def test_worker_counters_add_up_across_worker_restarts():
    m = Metrics()
    m.update_counters({"records_written": 5, "export_spooled": 3, "export_loki_sent": 4,
                       "upstream_reused": 9, "upstream_idle": 2}, worker_pid=10)
    m.update_counters({"records_written": 7, "export_spooled": 2, "export_loki_sent": 6},
                      worker_pid=10)
    m.update_counters({"records_written": 1, "export_spooled": 0, "export_loki_sent": 1},
                      worker_pid=11)  # a new worker starts at zero
    got = samples(m.render(lambda: STATE))
    assert got["llmtap_records_written_total"] == 8
    assert got["llmtap_upstream_connections_reused_total"] == 9  # the pool's (llmtap.upstream_pool)
    assert got['llmtap_export_sent_total{store="loki"}'] == 7
    assert 'llmtap_export_sent_total{store="clickhouse"}' not in got  # not configured
    assert got["llmtap_export_spooled"] == 0


def test_label_values_are_escaped_and_series_bounded(monkeypatch):
    monkeypatch.setattr(metrics, "MAX_SERIES", 3)
    m = Metrics()
    m.observe([end(model='we"ird\\model\nx')] + [end(model=f"m{i}") for i in range(5)])
    text = m.render(lambda: STATE)
    assert 'model="we\\"ird\\\\model\\nx"' in text
    got = samples(text)
    calls = [k for k in got if k.startswith("llmtap_requests_total{")]
    assert len(calls) == 4 and sum(got[k] for k in calls) == 6  # three, then "other"
    assert any('model="other"' in k for k in calls)


@pytest.fixture
def server():
    state = {"status": "intercepting"}
    served = MetricsServer(("127.0.0.1", 0), lambda: "llmtap_up 1\n", lambda: dict(state),
                           token="0123456789abcdef")
    yield served, state
    served.close()


def fetch(port: int, path: str, token: str | None = "0123456789abcdef") -> tuple[int, bytes, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers["Content-Type"]


def test_server_needs_its_token_and_health_follows_the_state(server):
    served, state = server
    assert fetch(served.port, "/metrics", token=None)[0] == 401
    assert fetch(served.port, "/metrics", token="0123456789abcdeX")[0] == 401
    status, body, kind = fetch(served.port, "/metrics")
    assert (status, body, kind) == (200, b"llmtap_up 1\n", metrics.CONTENT_TYPE)
    assert fetch(served.port, "/health")[0] == 200
    state["status"] = "healing"
    status, body, _ = fetch(served.port, "/health")
    assert status == 503 and json.loads(body)["status"] == "healing"
    assert fetch(served.port, "/other")[0] == 404


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    ('[metrics]\nlisten = "0.0.0.0:9464"', "is not a loopback address"),
    ('[metrics]\nlisten = "0.0.0.0:9464"\nallow_non_loopback = true', "bearer_token"),
    ('[metrics]\nlisten = "0.0.0.0:9464"\nbearer_token = "0123456789abcdef"',
     "allow_non_loopback"),
    ('[metrics]\nlisten = "localhost:9464"', "metrics.listen must look like"),
    ('[metrics]\nlisten = "127.0.0.1:8443"', "is redirect.proxy_port"),
    ('[export.loki]\nurl = "loki:3100"', "export.loki.url must be an http(s) URL"),
    ('[export.clickhouse]\ntable = "x; DROP"', "export.clickhouse.table must be a plain"),
])
def test_bad_metrics_and_export_config_names_the_key(tmp_path, text, message):
    with pytest.raises(UsageError) as caught:
        load_config(write(tmp_path, text))
    assert message in str(caught.value)


def test_a_non_loopback_metrics_address_with_both_settings_is_accepted(tmp_path):
    config = load_config(write(tmp_path, '[metrics]\nlisten = "[::]:9464"\n'
                               'allow_non_loopback = true\nbearer_token = "0123456789abcdef"'))
    assert config.metrics.address == ("::", 9464)
