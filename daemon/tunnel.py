"""`llmtap tunnel`: this machine's explicit proxy on a remote machine's loopback, through ssh -R.

The system `ssh` binds 127.0.0.1:<remote port> on the remote machine and carries each connection
made to it back here, to the explicit listener. The remote machine's tools reach the LLM APIs
through this machine, which injects the real keys, so the remote machine never holds them.
Only TCP is carried (ssh forwards streams): no UDP, so no QUIC and no DNS; names are resolved
here, by the proxy.

ssh runs with -v so that "remote forward success" tells us the tunnel is up; the rest of its
debug output is dropped. When ssh exits the tunnel reconnects, waiting longer after each failure,
except when the very first attempt fails: that is a setup problem (key, host key, port taken) and
is reported once, like autossh does.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.linux.proc import parent_death_signal

SERVER_ALIVE_S = 15  # with ServerAliveCountMax=3, a silently dead link is noticed within ~45 s
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_S = 10.0  # a tunnel that stayed up this long starts the backoff over
UP_MARK = "remote forward success"
# ssh -v lines that are not news for the user (debug output, banner, byte counts at exit).
QUIET_PREFIXES = ("debug", "OpenSSH_", "Transferred:", "Bytes per second", "Authenticated to")
SYSTEM_ROOTS_HINT = "/etc/ssl/certs/ca-certificates.crt"  # Debian/Ubuntu; elsewhere /etc/ssl/cert.pem
REMOTE_BUNDLE = "$HOME/.llmtap-bundle.pem"
SSH_OPTION_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(=|\s+)\S")
DESTINATION_RE = re.compile(r"^[^\s-][^\s]*$")


@dataclass(frozen=True)
class TunnelSpec:
    destination: str  # [user@]host, as ssh takes it
    remote_port: int
    local: tuple[str, int]  # the explicit listener
    ssh_options: tuple[str, ...] = ()


def check_spec(spec: TunnelSpec) -> None:
    if not DESTINATION_RE.match(spec.destination):
        raise UsageError(f"destination {spec.destination!r} must look like user@host (no leading '-')")
    for option in spec.ssh_options:
        if not SSH_OPTION_RE.match(option):
            raise UsageError(f"--ssh-option {option!r} must look like Name=value (as ssh -o takes it)")


def ssh_command(spec: TunnelSpec, ssh: str = "ssh") -> list[str]:
    """ssh keeps the first value it sees for an option: ours that must hold come before the
    user's, the defaults the user may change come after."""
    host, port = spec.local
    local = f"[{host}]" if ":" in host else host
    return [
        ssh, "-N", "-T", "-v",
        "-o", "ExitOnForwardFailure=yes",  # a remote port already taken is a failure, not a no-op
        "-o", "ControlPath=none",  # a forward on a shared master connection would outlive us
        *(arg for option in spec.ssh_options for arg in ("-o", option)),
        "-o", "BatchMode=yes",  # reconnects happen unattended: never wait at a prompt
        "-o", f"ServerAliveInterval={SERVER_ALIVE_S}",
        "-o", "ServerAliveCountMax=3",
        "-o", "ConnectTimeout=15",
        # Bound to the remote loopback whatever the server's GatewayPorts says.
        "-R", f"127.0.0.1:{spec.remote_port}:{local}:{port}",
        "--", spec.destination,
    ]


def exports(spec: TunnelSpec, ca_path: str, placeholders: list[str]) -> list[str]:
    """What to paste into the remote shell."""
    url = f"http://127.0.0.1:{spec.remote_port}"
    return [
        f"# llmtap tunnel: on {spec.destination}, {url} is this machine's llmtap proxy.",
        "# Only TCP is carried (no UDP: no QUIC, no DNS). Once, give the remote tools llmtap's CA",
        f"# ({ca_path}) next to their usual roots ({SYSTEM_ROOTS_HINT} there):",
        f"#   ssh {spec.destination} 'cat {SYSTEM_ROOTS_HINT} - > .llmtap-bundle.pem' < {ca_path}",
        "# then, in the remote shell:",
        f"export HTTPS_PROXY={url}",
        f"export https_proxy={url}",
        "export NO_PROXY=localhost,127.0.0.1,::1",
        "export no_proxy=localhost,127.0.0.1,::1",
        *(f'export {var}="{REMOTE_BUNDLE}"'
          for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")),
        *placeholders,
    ]


def listening(address: tuple[str, int]) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(address, timeout=2):
        return True
    return False


class Tunnel:
    """Runs ssh until stopped, reconnecting with backoff. `stop` may be set from a signal handler."""

    def __init__(self, spec: TunnelSpec, say: Callable[[str], None]) -> None:
        self.spec = spec
        self.say = say
        self.stop = threading.Event()
        self.up = threading.Event()
        self.last_error = ""
        self.ssh = shutil.which("ssh") or ""
        if not self.ssh:
            raise RuntimeFailure("ssh not found: install the OpenSSH client (apt-get install openssh-client)")

    def run(self) -> int:
        delay = BACKOFF_FIRST_S
        ever_up = False
        while not self.stop.is_set():
            started = time.monotonic()
            code = self._attempt()
            if self.stop.is_set():
                break
            reason = self.last_error or f"ssh exited with code {code}"
            if not ever_up and not self.up.is_set():
                raise RuntimeFailure(f"ssh to {self.spec.destination} failed: {reason}{_hint(reason)}")
            ever_up = True
            if self.up.is_set() and time.monotonic() - started >= STABLE_S:
                delay = BACKOFF_FIRST_S
            self.say(f"the tunnel is down ({reason}); reconnecting in {delay:.0f} s")
            self.stop.wait(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
        self.say("stopped")
        return 0

    def _attempt(self) -> int:
        self.up.clear()
        self.last_error = ""
        proc = subprocess.Popen(
            ssh_command(self.spec, self.ssh),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,  # Ctrl-C reaches us only; we stop ssh ourselves
            preexec_fn=_dies_with(sys.platform),
        )
        assert proc.stderr is not None
        reader = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        reader.start()
        while proc.poll() is None:
            if self.stop.wait(0.2):
                _terminate(proc)
        reader.join(timeout=2)
        return proc.returncode

    def _read(self, stream: IO[str]) -> None:
        for raw in stream:
            line = raw.strip()
            if UP_MARK in line:
                self.up.set()
                self.last_error = ""  # what ssh said while connecting is not why it drops later
                self.say(f"up: 127.0.0.1:{self.spec.remote_port} on {self.spec.destination} -> "
                         f"{_show(self.spec.local)} here")
            elif line and not line.startswith(QUIET_PREFIXES):
                self.last_error = line
                self.say(f"ssh: {line}")


def _dies_with(platform: str) -> Callable[[], None] | None:
    """ssh follows us even when we are SIGKILLed (Linux); elsewhere it notices its closed pipe."""
    if not platform.startswith("linux"):
        return None
    return functools.partial(parent_death_signal, os.getpid())


def _terminate(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _hint(reason: str) -> str:
    if "Host key verification failed" in reason:
        return (" (connect once with plain ssh to accept the host key, or add "
                "-o StrictHostKeyChecking=accept-new)")
    if "Permission denied" in reason:
        return " (the tunnel needs key-based login: BatchMode never prompts for a password)"
    if "forwarding failed" in reason:
        return " (the remote port is taken: choose another with --remote-port)"
    return ""


def _show(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
