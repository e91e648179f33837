"""The Linux transparent tap, end to end: real clients in a network namespace, no proxy settings.

Interception is proven by trust: a client given only llmtap's CA can reach a target only if llmtap
terminated its TLS; a client given only the upstream's CA reaches a non-target only if llmtap
relayed it untouched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from testbed import OTHER_HOST, SHARED_HOST, Daemon, Testbed

pytestmark = pytest.mark.root


def wait_until(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def assert_direct_again(testbed: Testbed) -> None:
    """No tap in the way: the target answers with the upstream's own certificate."""
    testbed.curl("https://api.anthropic.com/direct", cacert=testbed.upstream_ca_pem)
    assert "llmtap" not in testbed.nft_tables()
    assert "llmtap" not in testbed.iptables_rules()


def test_curl_http1_and_http2_to_target_are_intercepted_and_recorded(testbed, llmtap):
    daemon = llmtap()
    for flag in ("--http1.1", "--http2"):
        result = testbed.curl("https://api.anthropic.com/v1/models?x=1", daemon.ca_pem, flag)
        assert json.loads(result.stdout)["path"] == "/v1/models"
        seen = testbed.upstream_requests()[-1]
        assert seen["path"] == "/v1/models"
        # The worker's own upstream connection was not redirected back to itself.
        assert seen["client"][0] in (testbed.client_v4, testbed.client_v6)
    records = daemon.records(expected=2)
    assert [r["http_version"] for r in records] == ["HTTP/1.1", "HTTP/2.0"]
    for record in records:
        assert record["host"] == "api.anthropic.com"
        assert (record["method"], record["path"], record["status"]) == ("GET", "/v1/models?x=1", 200)
        assert record["started_at"].endswith("Z") and record["ended_at"].endswith("Z")
        assert record["duration_ms"] >= 0
    assert len(testbed.upstream_requests()) == 2


def test_llmtap_ca_is_not_trusted_for_non_targets(testbed, llmtap):
    daemon = llmtap()
    refused = testbed.curl(f"https://{SHARED_HOST}/", daemon.ca_pem, check=False)
    assert refused.returncode == 60, refused.stderr  # the peer's certificate is not llmtap's


@pytest.mark.parametrize("scope", ["targets", "all"])
def test_non_targets_are_relayed_untouched(testbed, llmtap, scope):
    daemon = llmtap(scope=scope)
    for host in (OTHER_HOST, SHARED_HOST):
        result = testbed.curl(f"https://{host}/file", testbed.upstream_ca_pem)
        assert json.loads(result.stdout)["host"] == host
    time.sleep(1.2)  # counters are reported every second
    counters = daemon.status()["counters"]
    assert daemon.records() == []
    assert counters["intercepted"] == 0
    # SHARED_HOST shares the targets' address, so it always reaches the proxy (and is passed
    # through by SNI); OTHER_HOST reaches it only when the scope is "all".
    assert counters["passthrough"] == (2 if scope == "all" else 1)


def test_httpx_http2_and_ipv6(testbed, llmtap):
    daemon = llmtap()
    code = f"""
        import httpx, json
        with httpx.Client(http2=True, verify="{daemon.ca_pem}") as client:
            r = client.get("https://api.openai.com/v1/models")
            print(json.dumps([r.http_version, r.json()["path"]]))
    """
    assert json.loads(testbed.python(code).stdout) == ["HTTP/2", "/v1/models"]
    ipv6 = testbed.curl("https://api.openai.com/v6", daemon.ca_pem, "-6")
    assert json.loads(ipv6.stdout)["path"] == "/v6"
    assert testbed.upstream_requests()[-1]["client"][0] == testbed.client_v6
    assert [r["path"] for r in daemon.records(expected=2)] == ["/v1/models", "/v6"]


def test_streamed_response_arrives_complete_and_unchanged(testbed, llmtap):
    daemon = llmtap()
    body = '{"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": true, "messages": []}'
    tapped = testbed.curl("https://api.anthropic.com/v1/messages", daemon.ca_pem, "-N",
                          "-H", "content-type: application/json", "-d", body)
    daemon.stop()
    direct = testbed.curl("https://api.anthropic.com/v1/messages", testbed.upstream_ca_pem, "-N",
                          "-H", "content-type: application/json", "-d", body)
    assert tapped.stdout == direct.stdout
    assert "event: message_stop" in tapped.stdout
    [record] = daemon.records(expected=1)
    assert record["stream"] is True


def test_status_reports_the_running_tap(testbed, llmtap):
    daemon = llmtap()
    status = daemon.status()
    assert status["backend"] == "nft"
    assert status["scope"] == "targets"
    assert status["rules_present"] is True
    assert set(status["listening"]) == {"127.0.0.1:8443", "::1:8443"}
    assert status["targets"]["api.anthropic.com"] == sorted(
        [testbed.upstream_v4, testbed.upstream_v6])
    assert testbed.upstream_v4 in status["addresses"]["v4"]
    assert testbed.upstream_v6 in status["addresses"]["v6"]
    worker_user = subprocess.run(["ps", "-o", "user=", "-p", str(status["worker_pid"])],
                                 capture_output=True, text=True).stdout.strip()
    assert worker_user == "llmtap"
    assert "table inet llmtap" in testbed.nft_tables()
    # Its record writer: a child at idle priority where it may come back to nice 0 when it lags
    # (RLIMIT_NICE 20, which root without CAP_SYS_RESOURCE cannot grant), else at nice 10
    # (tests/unit/records/test_records.py).
    writer = int(subprocess.run(["pgrep", "-P", str(status["worker_pid"])], capture_output=True,
                                text=True).stdout.split()[0])
    limits = Path(f"/proc/{writer}/limits").read_text().splitlines()
    may_leave_idle = int(next(line for line in limits if line.startswith("Max nice")).split()[3]) >= 20
    if may_leave_idle:
        assert os.sched_getscheduler(writer) == os.SCHED_IDLE
    else:
        assert (os.sched_getscheduler(writer), os.getpriority(os.PRIO_PROCESS, writer)) == (
            os.SCHED_OTHER, 10)


def test_sigterm_removes_everything_and_exits_0(testbed, llmtap):
    daemon = llmtap()
    assert daemon.stop(signal.SIGTERM) == 0
    assert "removing the redirect" in daemon.stderr()
    assert_direct_again(testbed)
    assert daemon.llmtap("status", "--json").stdout.count('"running": false') == 1


def kill_and_check(testbed: Testbed, daemon: Daemon, pid: int) -> None:
    subprocess.run(["kill", "-KILL", str(pid)], check=True)
    assert wait_until(lambda: "llmtap" not in testbed.nft_tables(), timeout=10)
    assert_direct_again(testbed)


def test_sigkill_of_supervisor_leaves_no_rule_and_restart_is_clean(testbed, llmtap):
    daemon = llmtap()
    worker_pid = daemon.status()["worker_pid"]
    kill_and_check(testbed, daemon, daemon.proc.pid)
    # The worker follows its supervisor (parent-death signal): the port is free again.
    assert wait_until(lambda: subprocess.run(["kill", "-0", str(worker_pid)],
                                             capture_output=True).returncode != 0)
    again = llmtap()
    testbed.curl("https://api.anthropic.com/after-crash", again.ca_pem)
    assert again.records(expected=1)[0]["path"] == "/after-crash"


def test_scope_all_does_not_loop_the_proxy_through_itself(testbed, llmtap):
    daemon = llmtap(scope="all")
    testbed.curl("https://api.openai.com/once", daemon.ca_pem)
    assert [r["path"] for r in testbed.upstream_requests()] == ["/once"]
    time.sleep(1.2)
    counters = daemon.status()["counters"]
    assert counters["connections"] == 1 and counters["intercepted"] == 1


def test_iptables_backend_intercepts_and_cleans_up_even_after_sigkill(testbed, llmtap):
    daemon = llmtap(backend="iptables")
    assert daemon.status()["backend"] == "iptables"
    assert "LLMTAP" in testbed.iptables_rules()
    assert "llmtap" not in testbed.nft_tables()
    testbed.curl("https://api.anthropic.com/v4", daemon.ca_pem)
    testbed.curl("https://api.anthropic.com/v6", daemon.ca_pem, "-6")
    assert len(daemon.records(expected=2)) == 2
    # These rules do not die with the process: the guardian removes them.
    subprocess.run(["kill", "-KILL", str(daemon.proc.pid)], check=True)
    assert wait_until(lambda: "LLMTAP" not in testbed.iptables_rules())
    assert_direct_again(testbed)


def test_leftovers_are_removed_by_cleanup_and_at_start(testbed, llmtap):
    def leave_nft_table() -> None:  # as a crashed run of another kind would: not owned by anyone
        testbed.ns_exec(testbed.client_ns, "nft", "add", "table", "inet", "llmtap")
        testbed.ns_exec(testbed.client_ns, "nft", "add chain inet llmtap c "
                        "{ type nat hook output priority -100; }")

    leave_nft_table()
    daemon = llmtap(wait=False)
    daemon.wait_ready()
    assert "removed llmtap rules left by an earlier run (nft)" in daemon.stderr()
    daemon.stop()
    leave_nft_table()
    testbed.ns_exec(testbed.client_ns, "iptables", "-t", "nat", "-N", "LLMTAP")
    testbed.ns_exec(testbed.client_ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
                    "-m", "comment", "--comment", "llmtap", "-j", "LLMTAP")
    cleaned = daemon.llmtap("cleanup")
    assert "removed llmtap rules (nft, iptables)" in cleaned.stdout
    assert_direct_again(testbed)
    assert "no llmtap rules found" in daemon.llmtap("cleanup").stdout


def test_quic_to_targets_is_rejected(testbed, llmtap):
    echo = subprocess.Popen(
        ["ip", "netns", "exec", testbed.upstream_ns, "python3", "-c",
         "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
         f"s.bind(('{testbed.upstream_v4}',443))\n"
         "print('up', flush=True)\n"
         "while True:\n d,a=s.recvfrom(99); s.sendto(d,a)"], stdout=subprocess.PIPE, text=True)
    probe = """
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
        s.connect(("api.openai.com", 443))
        try:  # a locally generated packet rejected in the output hook fails the send itself
            s.send(b"quic?")
            print(s.recv(99).decode())
        except (ConnectionRefusedError, PermissionError):
            print("rejected")
    """
    try:
        assert echo.stdout and echo.stdout.readline().strip() == "up"
        assert testbed.python(probe).stdout.strip() == "quic?"
        llmtap()
        assert testbed.python(probe).stdout.strip() == "rejected"
    finally:
        echo.kill()


def test_startup_refusals_are_one_line_with_exit_2(testbed, llmtap):
    blocker = subprocess.Popen(
        ["ip", "netns", "exec", testbed.client_ns, "python3", "-c",
         "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',8443))\ns.listen()\n"
         "print('up',flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert blocker.stdout and blocker.stdout.readline().strip() == "up"
        daemon = llmtap(wait=False)
        assert daemon.proc.wait(timeout=30) == 2
        assert daemon.stderr().strip() == (
            "llmtap: port 8443 on 127.0.0.1 is already in use: stop what uses it or set "
            "redirect.proxy_port")
    finally:
        blocker.kill()
    no_tools = testbed.client("env", "PATH=/nonexistent", daemon.proc.args[4], "run",
                              "--config", str(daemon.config_path), check=False)
    assert no_tools.returncode == 2
    assert no_tools.stderr.strip().startswith("llmtap: neither nft nor iptables is usable here")
    assert "llmtap" not in testbed.nft_tables()


def test_target_addresses_follow_dns_changes(testbed, llmtap):
    hosts_file = Path(f"/etc/netns/{testbed.client_ns}/hosts")
    original = hosts_file.read_text()
    daemon = llmtap(dns_refresh_max_s=1, dns_grace_s=2)
    try:
        with open(hosts_file, "a") as hosts:  # in place: the daemon sees it through a bind mount
            hosts.write(f"{testbed.other_v4} api.openai.com\n")
        assert wait_until(lambda: testbed.other_v4 in daemon.status()["addresses"]["v4"])
        nft_set = testbed.ns_exec(testbed.client_ns, "nft", "list", "set", "inet", "llmtap",
                                  "targets4").stdout
        assert testbed.other_v4 in nft_set
    finally:
        hosts_file.write_text(original)
    # Gone from DNS: kept for the grace period, then dropped.
    assert testbed.other_v4 in daemon.status()["addresses"]["v4"]
    assert wait_until(lambda: testbed.other_v4 not in daemon.status()["addresses"]["v4"])
