"""The WAN part of bench/run.py: each arm measured again with the upstream 40 ms away (bench/wan.py),
without and with 1% packet loss, by fresh clients (a new process and connection per request, as
`claude -p`, `codex exec`, SDK scripts and hooks do) as well as kept-alive ones.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
DELAY_MS = 20.0  # each way
LINKS = (("", 0.0), ("lossy_", 0.01))  # (results prefix, loss)
TARGET = "https://api.anthropic.com"


@contextlib.contextmanager
def wan_link(bed: Any, loss: float) -> Iterator[None]:
    upstream = (bed.upstream_v4, bed.upstream_v6, bed.other_v4, bed.other_v6)
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "wan.py"), "--client-ns", bed.client_ns, "--upstream-ns",
         bed.upstream_ns, "--client-addr", bed.client_v4, "--client-addr", bed.client_v6,
         *(arg for address in upstream for arg in ("--upstream-addr", address)),
         "--delay-ms", str(DELAY_MS), "--loss", str(loss)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the WAN link did not start")
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def curl_first_ms(arm: Any) -> float:
    """curl's own total (its default ALPN offers h2): connect, TLS and the request."""
    out = arm.bed.client("curl", "-sS", "-o", "/dev/null", "-w", "%{time_total}", "--fail", "--cacert",
                         arm.cacert, "-H", "x-api-key: bench", "-H", "content-type: application/json",
                         "-d", '{"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": []}',
                         f"{TARGET}/v1/messages?bench=json", timeout=60, check=False)
    return float(out.stdout) * 1000 if out.returncode == 0 else float("nan")


def measure_wan_round(arm: Any, quick: bool, rounds: int) -> None:
    """This round's share of the WAN samples; the first fresh client of each link is a warm-up
    for every arm alike (the daemon's first certificate; for llmtap, an empty pool)."""
    fresh = max((8 if quick else 30) // rounds, 3)
    r = arm.results
    reply = f"{TARGET}/v1/messages?bench=json"
    for prefix, loss in LINKS:
        with wan_link(arm.bed, loss):
            runs = [arm.client("first", reply, arm.cacert) for _ in range(fresh + 1)]
            r.setdefault(f"wan_{prefix}fresh_ms", []).extend(ms for run in runs[1:] for ms in run["ms"])
            r[f"wan_{prefix}failed"] = r.get(f"wan_{prefix}failed", 0) + sum(run["failures"] for run in runs)
            curls = [curl_first_ms(arm) for _ in range(fresh)]
            r.setdefault(f"wan_{prefix}curl_ms", []).extend(ms for ms in curls if ms == ms)
            if prefix:
                continue
            r.setdefault("wan_keepalive_ms", []).extend(
                arm.client("latency", reply, arm.cacert, "--n", str(fresh))["ms"])
            streamed = arm.client("stream", f"{TARGET}/v1/messages?bench=stream&n=30&gap_ms=20",
                                  arm.cacert, "--repeat", "2")
            r.setdefault("wan_ttfb_ms", []).extend(streamed["ttfb_ms"])
            r.setdefault("wan_chunk_delay_ms", []).extend(streamed["chunk_delay_ms"])


ROWS = (("wan_fresh_ms", "fresh client's first request, httpx (HTTP/1.1) (ms)"),
        ("wan_curl_ms", "fresh client's first request, curl (offers h2) (ms)"),
        ("wan_keepalive_ms", "request latency, kept-alive connection (ms)"),
        ("wan_ttfb_ms", "stream time to first byte, kept-alive (ms)"),
        ("wan_chunk_delay_ms", "stream per-chunk delay, server send to client read (ms)"),
        ("wan_lossy_fresh_ms", "1% loss: fresh client's first request, httpx (ms)"),
        ("wan_lossy_curl_ms", "1% loss: fresh client's first request, curl (ms)"))


def wan_table(arms: dict[str, Any], summary: Callable[[list[float]], dict[str, float]],
              fmt: Callable[[float], str], ratio: Callable[[float, float], str]) -> list[str]:
    lines = [f"| with {2 * DELAY_MS:.0f} ms RTT to the upstream | direct | bare mitmproxy | llmtap "
             "| llmtap/bare | llmtap/direct |", "|---|---|---|---|---|---|"]
    for key, label in ROWS:
        for q in ("p50", "p95"):
            d, b, l_ = (summary(arms[a].results.get(key, []))[q] for a in ("direct", "bare", "llmtap"))
            lines.append(f"| {label} {q} | {fmt(d)} | {fmt(b)} | {fmt(l_)} | {ratio(l_, b)} "
                         f"| {ratio(l_, d)} |")
    failed = {a: arms[a].results.get("wan_failed", 0) + arms[a].results.get("wan_lossy_failed", 0)
              for a in ("direct", "bare", "llmtap")}
    lines.append(f"| fresh httpx clients that failed (both links) | {failed['direct']} | "
                 f"{failed['bare']} | {failed['llmtap']} | | |")
    lines += ["", "curl offers HTTP/2 and speaks it with llmtap; its request goes upstream on a "
              "pooled HTTP/1.1 connection like httpx's (llmtap.upstream_pool)."]
    return lines
