"""What llmtap costs, measured in one run against a bare mitmproxy and a direct connection.

    sudo .venv/bin/python bench/run.py [--quick] [--rounds N]

Runs as root in the test bed's network namespaces (tests/support/testbed.py): a client namespace where the
clients and the daemon run, and an upstream namespace with the fake provider. Three arms:
  direct  no redirect: the client talks to the upstream itself
  bare    `llmtap run --bare`: same redirect, listeners and TLS, but no pipeline addons
  llmtap  `llmtap run`: the full pipeline
Prints a table and rewrites bench/RESULTS.md. Targets are shown, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests" / "support"))

from testbed import (  # noqa: E402 - the test bed lives with the tests
    OTHER_HOST,
    Daemon,
    Testbed,
    new_testbed,
    start_daemon,
)
from wan_arms import measure_wan_round, wan_table  # noqa: E402 - after the path above

ARMS = ("direct", "bare", "llmtap")
TARGET = "https://api.anthropic.com"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values) if values else float("nan"),
            "p95": pct(values, 95), "p99": pct(values, 99), "max": max(values, default=float("nan"))}


@dataclass
class Arm:
    name: str
    bed: Testbed
    daemon: Daemon | None = None
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def cacert(self) -> str:
        return str(self.daemon.ca_pem if self.daemon else self.bed.upstream_ca_pem)

    def client(self, *args: str) -> dict[str, Any]:
        out = self.bed.client(sys.executable, str(BENCH / "client.py"), *args, timeout=600)
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def worker_pid(self) -> int:
        return int(self.daemon.status()["worker_pid"]) if self.daemon else 0

    def daemon_pids(self) -> list[int]:
        """The supervisor and all it started (worker, record writer, nft, guardian)."""
        if not self.daemon:
            return []
        root = psutil.Process(self.daemon.proc.pid)
        return [root.pid, *(child.pid for child in root.children(recursive=True))]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a short-lived child (nft) went away
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def pss_mb(pids: list[int]) -> float:
    """The memory these processes cost together: each shared page (the writer process is a fork
    of the worker) counted once, in shares, where summed RSS would count it in every process."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:  # a short-lived child (nft) went away
            continue
    return total / 1024


class PeakPss:
    """Samples the daemon's PSS while a load runs, keeping the highest."""

    def __init__(self, pids: list[int], every_s: float = 0.25) -> None:
        self.pids, self.every_s, self.peak = pids, every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakPss:
        if self.pids:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self.pids:
            self._thread.join()
            self.peak = max(self.peak, pss_mb(self.pids))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, pss_mb(self.pids))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(bed: Testbed, arm: str, **redirect: Any) -> tuple[Daemon | None, float]:
    if arm == "direct":
        return None, 0.0
    began = time.perf_counter()
    daemon = start_daemon(bed, run_args=("--bare",) if arm == "bare" else (), **redirect)
    while "intercepting with" not in daemon.stderr():
        if daemon.proc.poll() is not None or time.perf_counter() - began > 60:
            raise RuntimeError(f"{arm} did not start: {daemon.stderr()}")
        time.sleep(0.01)
    ready = time.perf_counter() - began
    daemon.wait_ready()
    return daemon, ready


def measure_round(arm: Arm, quick: bool, rounds: int) -> None:
    """One round's share of every sample, added to what earlier rounds of this arm measured."""
    n = max((60 if quick else 300) // rounds, 10)
    r = arm.results
    reply = f"{TARGET}/v1/messages?bench=json"
    r.setdefault("keepalive_ms", []).extend(
        arm.client("latency", reply, arm.cacert, "--n", str(n))["ms"])
    r.setdefault("new_conn_ms", []).extend(
        arm.client("latency", reply, arm.cacert, "--n", str(max(n // 3, 5)), "--fresh")["ms"])
    streamed = arm.client("stream", f"{TARGET}/v1/messages?bench=stream&n=50&gap_ms=10", arm.cacert,
                          "--repeat", str(max((4 if quick else 12) // rounds, 2)))
    r.setdefault("ttfb_ms", []).extend(streamed["ttfb_ms"])
    r.setdefault("chunk_delay_ms", []).extend(streamed["chunk_delay_ms"])
    pids = arm.daemon_pids()
    for concurrency in (1, 50, 200):
        requests = max(concurrency * (2 if quick else 6) // rounds, concurrency,
                       (50 if quick else 240) // rounds)
        cpu_before = cpu_seconds(pids) if pids else 0.0
        worker_before = cpu_seconds([arm.worker_pid()]) if pids else 0.0
        with PeakPss(pids) as memory:
            load = arm.client("load", f"{TARGET}/v1/messages?bench=stream&n=10&gap_ms=5",
                              arm.cacert, "--concurrency", str(concurrency),
                              "--requests", str(requests))
        if pids:
            r["peak_pss_mb"] = max(r.get("peak_pss_mb", 0.0), memory.peak)
        total = r.setdefault(f"load{concurrency}", {"requests": 0, "seconds": 0.0, "failures": 0,
                                                    "cpu_s": 0.0, "worker_cpu_s": 0.0,
                                                    "chunk_delay_ms": []})
        total["requests"] += load["requests"]
        total["seconds"] += load["seconds"]
        total["failures"] += load["failures"]
        total["cpu_s"] += cpu_seconds(pids) - cpu_before if pids else float("nan")
        total["worker_cpu_s"] += cpu_seconds([arm.worker_pid()]) - worker_before if pids else float("nan")
        total["chunk_delay_ms"].extend(load["chunk_delay_ms"])
    if arm.daemon:
        rss = sum(peak_rss_mb(pid) for pid in arm.daemon_pids())
        r["peak_rss_mb"] = max(r.get("peak_rss_mb", 0.0), rss)
        r["worker_peak_rss_mb"] = max(r.get("worker_peak_rss_mb", 0.0),
                                      peak_rss_mb(arm.worker_pid()))


def load_row(load: dict[str, Any]) -> dict[str, float]:
    return {"req_per_s": load["requests"] / load["seconds"],
            "cpu_s_per_1000": load["cpu_s"] / load["requests"] * 1000,
            "worker_cpu_s_per_1000": load["worker_cpu_s"] / load["requests"] * 1000,
            "max_chunk_delay_ms": max(load["chunk_delay_ms"], default=float("nan"))}


def measure_passthrough(bed: Testbed, quick: bool, rounds: int) -> dict[str, Any]:
    """Direct and scope=all downloads take turns too; each side's median is compared."""
    size = 50_000_000 if quick else 200_000_000
    url = f"https://{OTHER_HOST}/bytes/{size}"
    direct, tapped, passed_all = [], [], 0
    for _ in range(rounds):
        direct.append(Arm("direct", bed).client("download", url, str(bed.upstream_ca_pem))["mb_per_s"])
        daemon, _ = start(bed, "llmtap", scope="all")
        try:
            tapped.append(Arm("llmtap", bed, daemon).client(
                "download", url, str(bed.upstream_ca_pem))["mb_per_s"])
            time.sleep(1.2)
            passed_all = daemon.status()["counters"].get("passthrough", 0)
        finally:
            daemon.stop()
    daemon, _ = start(bed, "llmtap", scope="targets")
    try:
        Arm("llmtap", bed, daemon).client("download", f"https://{OTHER_HOST}/bytes/1000",
                                           str(bed.upstream_ca_pem))
        time.sleep(1.2)
        reached = daemon.status()["counters"].get("connections", 0)
    finally:
        daemon.stop()
    return {"direct_mb_s": statistics.median(direct), "all_mb_s": statistics.median(tapped),
            "all_passthrough": passed_all, "targets_connections_reaching_proxy": reached}


RULE_TIMING = """
import json, time
from llmtap.platform.base import RedirectPlan, TargetAddresses
from llmtap.platform.linux.nft import NftBackend
from llmtap.platform.linux.iptables import IptablesBackend
plan = RedirectPlan(proxy_port=18443, service_uid=65534)
addresses = TargetAddresses(frozenset({"10.9.9.1", "10.9.9.2"}), frozenset({"fd09::1"}))
out = {}
for backend in (NftBackend, IptablesBackend):
    installs, removals = [], []
    for _ in range(10):
        b = backend(plan)
        t = time.perf_counter(); b.install(addresses); installs.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter(); b.remove(); removals.append((time.perf_counter() - t) * 1000)
    out[backend.name] = {"install_ms": sorted(installs)[5], "remove_ms": sorted(removals)[5]}
print(json.dumps(out))
"""


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    import mitmproxy.version

    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, "
            f"Python {platform.python_version()}, mitmproxy {mitmproxy.version.VERSION}")


def fmt(value: float) -> str:
    return f"{value:.2f}" if value == value else "n/a"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and b == b and a == a and b > 0 else "n/a"


def table(arms: dict[str, Arm], extra: dict[str, Any]) -> list[str]:
    lines = ["| measure | direct | bare mitmproxy | llmtap | llmtap/bare | llmtap/direct |",
             "|---|---|---|---|---|---|"]

    def row(label: str, values: dict[str, float], added: bool = False) -> None:
        d, b, l_ = values["direct"], values["bare"], values["llmtap"]
        if added:  # ratios of what the proxy adds over direct, the honest comparison
            lines.append(f"| {label} | {fmt(d)} | {fmt(b)} (+{fmt(b - d)}) | {fmt(l_)} (+{fmt(l_ - d)}) "
                         f"| {ratio(l_ - d, b - d)} (added) | {ratio(l_, d)} |")
        else:
            lines.append(f"| {label} | {fmt(d)} | {fmt(b)} | {fmt(l_)} | {ratio(l_, b)} | {ratio(l_, d)} |")

    for key, label in (("keepalive_ms", "request latency, kept-alive connection (ms)"),
                       ("new_conn_ms", "request latency, new connection (ms)"),
                       ("ttfb_ms", "stream time to first byte (ms)"),
                       ("chunk_delay_ms", "stream per-chunk delay (ms)")):
        for q in ("p50", "p95", "p99"):
            row(f"{label} {q}", {a: summary(arms[a].results[key])[q] for a in ARMS}, added=True)
    for c in (1, 50, 200):
        load = {a: load_row(arms[a].results[f"load{c}"]) for a in ARMS}
        row(f"{c} concurrent streams: requests/s", {a: load[a]["req_per_s"] for a in ARMS})
        row(f"{c} concurrent streams: max chunk delay (ms)",
            {a: load[a]["max_chunk_delay_ms"] for a in ARMS})
        row(f"{c} concurrent streams: daemon CPU s / 1000 requests",
            {a: load[a]["cpu_s_per_1000"] for a in ARMS})
        row(f"{c} concurrent streams: of which the proxy worker",
            {a: load[a]["worker_cpu_s_per_1000"] for a in ARMS})
    row("daemon peak PSS under load, all its processes (MB)",
        {a: arms[a].results.get("peak_pss_mb", float("nan")) for a in ARMS})
    row("daemon idle PSS, all its processes (MB, median)",
        {a: statistics.median(arms[a].results.get("idle_pss_mb", [float("nan")])) for a in ARMS})
    row("daemon peak RSS, all its processes summed (MB; shared pages counted twice)",
        {a: arms[a].results.get("peak_rss_mb", float("nan")) for a in ARMS})
    row("proxy worker peak RSS (MB)",
        {a: arms[a].results.get("worker_peak_rss_mb", float("nan")) for a in ARMS})
    row("start to ready (s), median", {a: statistics.median(arms[a].results.get("ready_s", [float("nan")]))
                                       for a in ARMS})
    p = extra["passthrough"]
    lines += ["", "| passthrough and rules | value |", "|---|---|",
              f"| non-target download, direct (MB/s, median) | {fmt(p['direct_mb_s'])} |",
              f"| non-target download through scope=all (MB/s, median) | {fmt(p['all_mb_s'])} "
              f"({ratio(p['all_mb_s'], p['direct_mb_s'])} of direct) |",
              f"| scope=all: connections passed through by SNI | {p['all_passthrough']} |",
              f"| scope=targets: non-target connections reaching the proxy | "
              f"{p['targets_connections_reaching_proxy']} |"]
    for backend, times in extra["rules"].items():
        lines.append(f"| {backend}: install / remove the redirect (ms, median of 10) | "
                     f"{fmt(times['install_ms'])} / {fmt(times['remove_ms'])} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="the arms take turns this many times, each measuring its share")
    parser.add_argument("--wan-only", action="store_true",
                        help="only the WAN table (RESULTS.md is then left alone)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/run.py needs root (network namespaces): sudo .venv/bin/python bench/run.py")
    bed = new_testbed()
    began = time.perf_counter()
    load_before = os.getloadavg()
    try:
        bed.create()
        bed.start_upstream()
        arms = {name: Arm(name, bed) for name in ARMS}
        for turn in range(args.rounds):
            # Taking turns, each round in a rotated order: a machine whose speed drifts (shared
            # VMs do, by a millisecond) weighs on every arm alike instead of on whichever ran last.
            for name in ARMS[turn % 3:] + ARMS[:turn % 3]:
                arm = arms[name]
                arm.daemon, ready = start(bed, name)
                arm.results.setdefault("ready_s", []).append(ready if arm.daemon else float("nan"))
                if arm.daemon:  # idle: ready, nothing served yet, the record writer settled
                    time.sleep(1.0)
                    arm.results.setdefault("idle_pss_mb", []).append(pss_mb(arm.daemon_pids()))
                try:
                    print(f"round {turn + 1}/{args.rounds}: measuring {name} ...", flush=True)
                    if not args.wan_only:
                        measure_round(arm, args.quick, args.rounds)
                    measure_wan_round(arm, args.quick, args.rounds)
                finally:
                    if arm.daemon:
                        arm.daemon.stop()
                    arm.daemon = None
        if args.wan_only:
            print("\n".join(wan_table(arms, summary, fmt, ratio)))
            return
        print("measuring passthrough and rule timing ...", flush=True)
        extra = {"passthrough": measure_passthrough(bed, args.quick, args.rounds),
                 "rules": json.loads(bed.python(RULE_TIMING).stdout)}
    finally:
        bed.destroy()
    lines = [*table(arms, extra), "", *wan_table(arms, summary, fmt, ratio)]
    took = time.perf_counter() - began
    report = [
        "# llmtap benchmark results", "",
        f"Generated by `bench/run.py{' --quick' if args.quick else ''}` in {took:.0f} s on "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}.", "",
        f"Machine: {machine()}. Load average (1, 5, 15 min) at the start "
        f"{', '.join(f'{x:.2f}' for x in load_before)}, at the end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (others' tests share the cores).", "",
        "All three arms run in the same network namespaces with the same clients (httpx) and the same",
        "fake upstream; bare and llmtap use the same nft redirect, listeners and TLS. \"(+x)\" is the",
        "time added over direct; llmtap/bare on latency rows compares those added times.",
        f"The arms took turns {args.rounds} times (in rotated order), each measuring its share of the",
        "samples, so that drift in the machine's speed weighs on every arm alike.", "",
        "Targets (shown, not asserted): llmtap within 1.1x of bare mitmproxy's added latency; per-chunk",
        "added delay under 1 ms at p99; 200 concurrent streams with no chunk delayed more than 50 ms",
        "and under 300 MB RSS; passthrough at 90% or more of direct.", "",
        "The WAN table (last) measures the arms again with the upstream 40 ms away: this kernel has",
        "no netem, so bench/wan.py delays every packet 20 ms each way in user space (a TUN link),",
        "and drops 1% of them in the lossy rows. A fresh client is a new process with a new",
        "connection per request; its first request is timed (connect and TLS included). Target:",
        "llmtap's fresh-client time at most 0.7x direct's; per-chunk delay unchanged.", "",
        *lines, "",
    ]
    print("\n".join(lines))
    (BENCH / "RESULTS.md").write_text("\n".join(report))


if __name__ == "__main__":
    main()
