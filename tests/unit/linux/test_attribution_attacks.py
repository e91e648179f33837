"""Attacks on who a connection is attributed to (llmtap.proclookup), with real processes."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time

import pytest
from credential_flows import write_secrets
from llmtap import secrets_store as store
from llmtap.forked_host import AnyBoundSecret
from llmtap.keybind import Binding
from llmtap.proclookup import Lookup

linux = pytest.mark.skipif(sys.platform != "linux", reason="/proc")


@linux
def test_a_socket_also_held_by_a_process_outside_the_chain_is_not_attributed_to_it():
    """The attack on --allow-exe: a process makes a socket, an allowed program started detached
    (double fork: not its child) inherits it, then the process connects and writes itself. The
    lookup scans newest pids first, finds the allowed program, and sees no parent holding it."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    helper = subprocess.Popen(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], pass_fds=[client.fileno()],
                              stdout=subprocess.PIPE, text=True)
    detached = int(helper.communicate()[0])
    try:
        client.connect(server.getsockname())
        time.sleep(0.1)
        found = Lookup().find(*client.getsockname()[:2], server.getsockname()[:2])
        assert found is None or found.get("held_elsewhere") or found["pid"] == os.getpid(), found
        assert found is None or "holds the connection too" in (Binding(exes=frozenset({
            "/usr/bin/sleep"})).check(found) or "")
    finally:
        os.kill(detached, 9)
        client.close()
        server.close()


@linux
def test_the_costly_holder_checks_run_only_while_a_key_is_bound(tmp_path):
    """Looking for other holders of a socket costs ~10 ms a connection: the supervisor does it only
    while the secret store holds a bound key, and a store it cannot read counts as bound."""
    gate = AnyBoundSecret(tmp_path)
    assert gate() is False  # no store yet
    write_secrets(tmp_path, ("open", ("api.anthropic.com",), "x-api-key", False, "sk-ant-api03-OPENKEY000"))
    assert gate() is False
    paths = store.StorePaths.under(tmp_path)
    [secret] = store.read_store(paths)
    store.write_store(paths, [dataclasses.replace(secret, allow_exes=("/usr/bin/curl",))], os.getgid())
    assert gate() is True
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    child = subprocess.Popen(["sleep", "30"], pass_fds=[client.fileno()])  # holds it too
    try:
        shallow = Lookup(deep=lambda: False).find(*client.getsockname()[:2], server.getsockname()[:2])
        deep = Lookup(deep=gate).find(*client.getsockname()[:2], server.getsockname()[:2])
        flags = ("shared", "held_elsewhere")  # the child found first, its parent (us) holding it too
        assert shallow is not None and not any(shallow.get(flag) for flag in flags)
        assert deep is not None and any(deep.get(flag) for flag in flags)
    finally:
        child.kill()
        child.wait()
        client.close()
        server.close()
