"""Faults injected into a running daemon: each part killed or hung, and the daemon heals.

Every test asserts that a client's requests keep working (through the tap again once healed),
what `status` reports, and that the records of exchanges completed before the fault are there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from testbed import Daemon, Testbed, start_daemon

pytestmark = pytest.mark.root


def wait_for(condition: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.1)
    return condition()


def both_cas(testbed: Testbed, daemon: Daemon) -> Path:
    """A client that trusts the tap and the upstream alike: its requests succeed tapped or
    direct, so a test can see that nothing hangs while the daemon heals."""
    bundle = testbed.workdir / "both-cas.pem"
    bundle.write_bytes(daemon.ca_pem.read_bytes() + testbed.upstream_ca_pem.read_bytes())
    return bundle


def tapped(testbed: Testbed, daemon: Daemon, tag: str) -> bool:
    """A request that went through the tap: the record for it appears."""
    testbed.curl(f"https://api.anthropic.com/{tag}", daemon.ca_pem)
    return bool(wait_for(lambda: any(r["path"] == f"/{tag}" for r in daemon.records()), 10))


def healed(daemon: Daemon, restarts: int) -> dict[str, Any] | None:
    status = daemon.status()
    ok = status.get("restarts") == restarts and status.get("rules_present") and not status["healing"]
    return status if ok else None


def test_a_killed_worker_is_replaced_and_the_redirect_comes_back(testbed, llmtap):
    daemon = llmtap()
    assert tapped(testbed, daemon, "before")
    old = daemon.status()["worker_pid"]
    time.sleep(0.3)  # the record of "before" has left the worker
    os.kill(old, signal.SIGKILL)
    status = wait_for(lambda: healed(daemon, 1))
    assert status, daemon.stderr()
    assert status["worker_pid"] != old and daemon.proc.poll() is None
    assert "exited (killed by SIGKILL)" in status["last_restart"]["reason"]
    assert status["last_restart"]["healed_in_s"] < 10
    assert tapped(testbed, daemon, "after")
    assert {"/before", "/after"} <= {r["path"] for r in daemon.records()}  # "before" survived


def test_a_hung_worker_is_noticed_within_seconds_and_nothing_hangs(testbed, llmtap):
    daemon = llmtap()
    bundle = both_cas(testbed, daemon)
    old = daemon.status()["worker_pid"]
    os.kill(old, signal.SIGSTOP)
    started = time.monotonic()
    # Hung proxy: the redirect is lifted within the heartbeat timeout, so this gets through.
    answer = testbed.curl("https://api.anthropic.com/while-hung", bundle, "--retry", "3",
                          "--retry-all-errors", "--retry-delay", "1")
    assert json.loads(answer.stdout)["path"] == "/while-hung"
    assert time.monotonic() - started < 12
    status = wait_for(lambda: healed(daemon, 1))
    assert status, daemon.stderr()
    assert "stopped answering" in status["last_restart"]["reason"]
    assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE
    assert tapped(testbed, daemon, "after-hang")


def nft_helper(daemon: Daemon) -> psutil.Process:
    helpers = [p for p in psutil.Process(daemon.status()["pid"]).children() if p.name() == "nft"]
    assert len(helpers) == 1, helpers
    return helpers[0]


def test_a_killed_nft_helper_is_replaced(testbed, llmtap):
    daemon = llmtap()
    old = nft_helper(daemon)
    old.kill()
    status = wait_for(lambda: healed(daemon, 1))
    assert status, daemon.stderr()
    assert "redirect rules were lost" in status["last_restart"]["reason"]
    assert nft_helper(daemon).pid != old.pid
    assert status["worker_pid"]  # the worker was fine and stays
    assert tapped(testbed, daemon, "after-nft")


def test_repeated_failure_ends_the_daemon_with_one_line(testbed, llmtap):
    daemon = llmtap()
    for _ in range(30):
        if daemon.proc.poll() is not None:
            break
        pid = wait_for(lambda: (s := daemon.status()).get("rules_present") and s.get("worker_pid"))
        if daemon.proc.poll() is None and pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
    assert daemon.proc.wait(timeout=30) == 1
    last = daemon.stderr().strip().splitlines()[-2:]
    assert any("failures in 120 s, the last: the proxy worker exited" in line for line in last), last
    assert "llmtap" not in testbed.nft_tables()


def record_writer(daemon: Daemon) -> psutil.Process:
    worker = psutil.Process(daemon.status()["worker_pid"])
    [writer] = [p for p in worker.children() if p.username() == worker.username()]
    return writer


def test_a_killed_record_writer_is_replaced_and_no_record_is_lost(testbed, llmtap):
    daemon = llmtap()
    for n in range(3):
        testbed.curl(f"https://api.anthropic.com/before-{n}", daemon.ca_pem)
    writer = record_writer(daemon)
    writer.kill()
    for n in range(3):
        testbed.curl(f"https://api.anthropic.com/after-{n}", daemon.ca_pem)
    wanted = {f"/{when}-{n}" for when in ("before", "after") for n in range(3)}
    assert wait_for(lambda: wanted <= {r["path"] for r in daemon.records()}), daemon.stderr()
    counters = wait_for(lambda: (c := daemon.status()["counters"]).get("record_writer_restarts") and c)
    assert counters["records_dropped"] == 0 and counters["records_written"] >= 3
    assert daemon.stderr().count("the record writer process died (killed by SIGKILL)") == 1


IDLE_FLOOD = """
import socket, sys, time
held = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("api.anthropic.com", 443))
        held.append(s)
    except OSError:
        pass
print(len(held), flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_an_idle_flood_from_one_user_leaves_another_users_requests_working(testbed):
    """A worker with 256 descriptors: without the per-user cap, 200 idle connections from one
    user (two descriptors each once intercepted) would starve every other request."""
    daemon = start_daemon(testbed, "", prefix=("prlimit", "--nofile=256:256"),
                          max_connections_per_user=48)
    try:
        daemon.wait_ready()
        flood = subprocess.Popen(  # the system's python3: root's venv is closed to nobody
            ["ip", "netns", "exec", testbed.client_ns, "setpriv", "--reuid=nobody",
             "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c", IDLE_FLOOD, "200", "30"],
            stdout=subprocess.PIPE, text=True)
        try:
            assert flood.stdout is not None
            held = int(flood.stdout.readline())
            assert held <= 48  # the kernel refused the rest: the proxy never saw them
            for n in range(5):
                answer = testbed.curl(f"https://api.anthropic.com/during-flood-{n}", daemon.ca_pem)
                assert json.loads(answer.stdout)["path"] == f"/during-flood-{n}"
            assert wait_for(lambda: "per-user connection cap" in daemon.stderr(), 10), daemon.stderr()
        finally:
            flood.kill()
            flood.wait()
    finally:
        daemon.stop()
