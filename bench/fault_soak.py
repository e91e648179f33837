"""A bounded fault soak: mixed client load on a running daemon while its parts are killed or hung.

    sudo .venv/bin/python bench/fault_soak.py [--seconds 120] [--clients 4]

In the test bed's namespaces (tests/support/testbed.py), like bench/run.py. Every FAULT_EVERY_S one fault
is injected, in turn: SIGKILL of the worker, SIGSTOP of the worker, SIGKILL of the record writer,
SIGKILL of the nft helper. The clients (one process each, httpx, trusting both the tap's CA and
the upstream's, so a request succeeds tapped or direct) loop over JSON calls and SSE streams
(waiting 0.25 s after a failure, as SDKs do before retrying) and log every request: whether it
succeeded and whether it went through the tap (the issuer of the certificate it saw). Reported:
peak memory of each kind of process, recovery time after each fault, requests failed, and
records lost (tapped requests that succeeded and have no record).
Appends its table to bench/RESULTS.md under "Fault soak".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests" / "support"))

from testbed import Daemon, Testbed, new_testbed, start_daemon  # noqa: E402

FAULT_EVERY_S = 15.0
FAULTS = ("kill worker", "stop worker", "kill writer", "kill nft helper")

CLIENT = textwrap.dedent("""\
    import json, sys, time, httpx
    name, bundle, until, log = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    n = 0
    with open(log, "a", buffering=1) as out:
        while time.time() < until:
            n += 1
            tag = f"{name}-{n}"
            stream = n % 3 == 0
            url = ("https://api.anthropic.com/v1/messages?bench=stream&n=20&gap_ms=20&t=" if stream
                   else "https://api.anthropic.com/v1/messages?bench=json&t=") + tag
            started, ok, tapped, error = time.time(), False, None, None
            try:
                with httpx.Client(verify=bundle, timeout=15) as client:
                    with client.stream("POST", url, json={"model": "claude-sonnet-4-5"}) as reply:
                        peer = reply.extensions["network_stream"].get_extra_info("ssl_object")
                        issuer = dict(x[0] for x in peer.getpeercert()["issuer"])
                        tapped = "llmtap" in issuer.get("commonName", "")
                        reply.read()
                        ok = reply.status_code == 200
                        error = None if ok else f"http {reply.status_code}"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:200]
            out.write(json.dumps({"tag": tag, "ok": ok, "tapped": tapped, "at": started,
                                  "s": time.time() - started, "error": error}) + "\\n")
            if not ok:
                time.sleep(0.25)  # as SDKs do before a retry: a failing client does not spin
""")


class Sampler:
    """Peak RSS per kind of process of the daemon, sampled every 0.25 s."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            with contextlib.suppress(psutil.Error, OSError, ValueError):
                for kind, proc in processes(self.daemon).items():
                    rss = proc.memory_info().rss / 2**20
                    self.peak[kind] = max(self.peak.get(kind, 0.0), rss)


def processes(daemon: Daemon) -> dict[str, psutil.Process]:
    """supervisor, spawner, worker, record writer, nft helper: the daemon's process tree."""
    status = daemon.status()
    supervisor = psutil.Process(status["pid"])
    found = {"supervisor": supervisor}
    for child in supervisor.children():
        if child.name() == "nft":
            found["nft helper"] = child
        elif child.pid != status["worker_pid"]:
            found["spawner"] = child
    worker = psutil.Process(status["worker_pid"])
    found["worker"] = worker
    writers = worker.children()
    if writers:
        found["record writer"] = writers[0]
    return found


def inject(daemon: Daemon, fault: str) -> None:
    procs = processes(daemon)
    if fault == "kill worker":
        procs["worker"].send_signal(signal.SIGKILL)
    elif fault == "stop worker":
        procs["worker"].send_signal(signal.SIGSTOP)
    elif fault == "kill writer":
        procs["record writer"].send_signal(signal.SIGKILL)
    else:
        procs["nft helper"].send_signal(signal.SIGKILL)


def recovered(daemon: Daemon, fault: str, before: dict[str, Any]) -> bool:
    status = daemon.status()
    if fault == "kill writer":
        return bool(status["counters"].get("record_writer_restarts"))
    return bool(status.get("restarts", 0) > before.get("restarts", 0) and status.get("rules_present")
                and not status.get("healing"))


def soak(bed: Testbed, seconds: float, clients: int) -> dict[str, Any]:
    daemon = start_daemon(bed)
    daemon.wait_ready()
    bundle = bed.workdir / "soak-cas.pem"
    bundle.write_bytes(daemon.ca_pem.read_bytes() + bed.upstream_ca_pem.read_bytes())
    script = bed.workdir / "soak_client.py"
    script.write_text(CLIENT)
    logs = [bed.workdir / f"soak-{i}.jsonl" for i in range(clients)]
    until = time.time() + seconds
    procs = [subprocess.Popen(["ip", "netns", "exec", bed.client_ns, sys.executable, str(script),
                               f"c{i}", str(bundle), str(until), str(log)])
             for i, log in enumerate(logs)]
    sampler = Sampler(daemon)
    sampler.start()
    recoveries: list[tuple[str, float]] = []
    try:
        n = 0
        while time.time() + FAULT_EVERY_S < until:
            time.sleep(FAULT_EVERY_S / 2)
            fault = FAULTS[n % len(FAULTS)]
            before = daemon.status()
            if fault == "kill writer" and before["counters"].get("record_writer_restarts"):
                fault = FAULTS[(n + 1) % len(FAULTS)]  # one writer replacement per worker life
            began = time.monotonic()
            inject(daemon, fault)
            while not recovered(daemon, fault, before) and time.monotonic() - began < 30:
                time.sleep(0.05)
            recoveries.append((fault, time.monotonic() - began))
            n += 1
            time.sleep(FAULT_EVERY_S / 2)
        for proc in procs:
            proc.wait(timeout=60)
    finally:
        sampler.stop()
        time.sleep(1.0)  # the last records reach the disk
        final = daemon.status()
        daemon.stop()
    requests = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    recorded_tags = {r["path"].rsplit("t=", 1)[-1] for r in daemon.records() if "t=" in r["path"]}
    tapped_ok = [r for r in requests if r["ok"] and r["tapped"]]
    lost = [r for r in tapped_ok if r["tag"] not in recorded_tags]
    failures: dict[str, int] = {}
    for r in requests:
        if not r["ok"]:
            failures[r["error"]] = failures.get(r["error"], 0) + 1
    return {"seconds": seconds, "clients": clients, "requests": len(requests), "failures": failures,
            "failed": sum(not r["ok"] for r in requests), "tapped": len(tapped_ok),
            "direct": sum(1 for r in requests if r["ok"] and r["tapped"] is False),
            "records_lost": len(lost), "recoveries": recoveries, "peak_rss_mb": sampler.peak,
            "restarts": final.get("restarts"), "exited": daemon.proc.returncode}


def report(result: dict[str, Any]) -> list[str]:
    lines = ["## Fault soak", "",
             f"`bench/fault_soak.py`: {result['clients']} client processes for {result['seconds']:.0f} s "
             f"(JSON calls and SSE streams), one fault every {FAULT_EVERY_S:.0f} s in turn.", "",
             "| measure | value |", "|---|---|",
             f"| requests | {result['requests']} ({result['tapped']} through the tap, "
             f"{result['direct']} direct while healing) |",
             f"| requests failed | {result['failed']} |",
             f"| records lost (tapped, succeeded, no record) | {result['records_lost']} |",
             f"| worker restarts seen in status | {result['restarts']} |"]
    for kind, peak in sorted(result["peak_rss_mb"].items()):
        lines.append(f"| peak RSS, {kind} (MB) | {peak:.0f} |")
    for fault, seconds in result["recoveries"]:
        lines.append(f"| recovery after {fault} (s) | {seconds:.2f} |")
    lines += ["", "Failed requests by reason:", ""]
    lines += [f"- {count}: {reason}" for reason, count in sorted(
        result["failures"].items(), key=lambda item: -item[1])]
    lines += ["", "Recovery is from the fault to `status` showing the redirect back (a hung worker "
              "is noticed after the 2 s heartbeat timeout; later faults in the same 120 s window "
              "wait out a longer backoff). Requests in flight on a killed worker are cut; new ones "
              "in the moment between a worker's death (or kill) and the redirect's removal are "
              "refused; a record lost is one still in the worker's 50 ms batch when it was killed."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("fault_soak.py: run it as root (network namespaces)")
    bed = new_testbed()
    try:
        bed.create()
        bed.start_upstream()
        result = soak(bed, args.seconds, args.clients)
    finally:
        bed.destroy()
    lines = report(result)
    print("\n".join(lines))
    results = BENCH / "RESULTS.md"
    text = results.read_text() if results.exists() else ""
    text = text.split("\n## Fault soak")[0].rstrip() + "\n\n" + "\n".join(lines) + "\n"
    results.write_text(text)


if __name__ == "__main__":
    main()
