"""Attacks on who a connection is attributed to (llmtap.proclookup), with real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
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
