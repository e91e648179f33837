"""The end-to-end test bed: a client and an upstream network namespace joined by a veth pair.

    client ns  (10.77.x.1, fd77:x::1)  <--veth-->  upstream ns (10.77.x.2, fd77:x::2)
    /etc/netns/<client>/hosts points the API host names at the upstream, where a fake provider
    (tests/support/fake_upstream.py) serves TLS with a test CA. llmtap runs in the client namespace;
    clients (curl, httpx, the SDKs) run there too, with no proxy variables at all.

Everything is torn down by the fixtures in conftest.py, whatever happens in the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

PREFIX = "lt"  # every namespace this suite makes starts with it (stale ones are removed)
TARGET_HOSTS = ("api.anthropic.com", "api.openai.com", "generativelanguage.googleapis.com")
# More provider hosts the fake upstream answers for (in the client's hosts file and the upstream's
# certificate) but that are not in the daemon's targets unless a test adds them (`extra_hosts`).
BEDROCK_HOST = "bedrock-runtime.us-east-1.amazonaws.com"  # AWS Bedrock's regional runtime endpoint
MORE_API_HOSTS = ("api.groq.com", "openrouter.ai", "api.deepseek.com", "api.mistral.ai",
                  "us-central1-aiplatform.googleapis.com", "aiplatform.googleapis.com", BEDROCK_HOST)
# Azure OpenAI resources, served under a certificate for `*.openai.azure.com` as Azure's own are.
AZURE_HOSTS = ("myres.openai.azure.com", "other.openai.azure.com")
# Not targets. OTHER_HOST has an address of its own; SHARED_HOST shares the targets' address, so
# in scope "targets" its connections reach the proxy and must be passed through by SNI.
OTHER_HOST = "files.example.net"
SHARED_HOST = "cdn.example.net"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
TESTS_DIR = Path(__file__).resolve().parent
LLMTAP = str(Path(sys.executable).parent / "llmtap")  # the installed command, as users run it


def sh(*args: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment with every proxy variable removed: interception must need none."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    env.update(extra or {})
    return env


def remove_stale_namespaces() -> None:
    """Deletes namespaces left by test runs that died; a live run's (its pid is in the name) stay."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
            continue
        if not _alive(int(parts[1])):
            sh("ip", "netns", "del", name, check=False)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_testbed() -> Testbed:
    """A test bed named after this process (so concurrent runs never clean up each other's)."""
    remove_stale_namespaces()
    return Testbed(tag=str(os.getpid()), subnet=os.getpid() % 200 + 10, workdir=make_workdir())


CURL_BAD_CERT = 60  # curl's "SSL certificate problem"


@dataclass
class Testbed:
    __test__ = False  # not a test class, whatever pytest thinks of its name
    tag: str
    subnet: int
    workdir: Path
    client_ns: str = ""
    upstream_ns: str = ""
    upstream_ca_pem: Path = field(default_factory=Path)
    upstream_log: Path = field(default_factory=Path)
    _upstream: subprocess.Popen[bytes] | None = None

    @property
    def client_v4(self) -> str:
        return f"10.77.{self.subnet}.1"

    @property
    def client_v6(self) -> str:
        return f"fd77:{self.subnet}::1"

    @property
    def upstream_v4(self) -> str:
        return f"10.77.{self.subnet}.2"

    @property
    def upstream_v6(self) -> str:
        return f"fd77:{self.subnet}::2"

    @property
    def other_v4(self) -> str:
        return f"10.77.{self.subnet}.3"

    @property
    def other_v6(self) -> str:
        return f"fd77:{self.subnet}::3"

    def create(self) -> None:
        self.client_ns = f"{PREFIX}-{self.tag}-cl"
        self.upstream_ns = f"{PREFIX}-{self.tag}-up"
        veth_c, veth_u = f"{self.tag}c", f"{self.tag}u"
        sh("ip", "netns", "add", self.client_ns)
        sh("ip", "netns", "add", self.upstream_ns)
        sh("ip", "link", "add", veth_c, "netns", self.client_ns, "type", "veth",
           "peer", "name", veth_u, "netns", self.upstream_ns)
        for ns, dev, last in ((self.client_ns, veth_c, 1), (self.upstream_ns, veth_u, 2)):
            self.ns_exec(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0")
            self.ns_exec(ns, "ip", "link", "set", "lo", "up")
            self.ns_exec(ns, "ip", "addr", "add", f"10.77.{self.subnet}.{last}/24", "dev", dev)
            self.ns_exec(ns, "ip", "-6", "addr", "add", f"fd77:{self.subnet}::{last}/64",
                         "dev", dev, "nodad")
            self.ns_exec(ns, "ip", "link", "set", dev, "up")
        self.ns_exec(self.upstream_ns, "ip", "addr", "add", f"{self.other_v4}/24", "dev", veth_u)
        self.ns_exec(self.upstream_ns, "ip", "-6", "addr", "add", f"{self.other_v6}/64",
                     "dev", veth_u, "nodad")
        self._write_netns_files()

    def _write_netns_files(self) -> None:
        etc = Path("/etc/netns") / self.client_ns
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        for host in (*TARGET_HOSTS, *MORE_API_HOSTS, *AZURE_HOSTS, SHARED_HOST):
            lines += [f"{self.upstream_v4} {host}", f"{self.upstream_v6} {host}"]
        lines += [f"{self.other_v4} {OTHER_HOST}", f"{self.other_v6} {OTHER_HOST}"]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        # No resolver is reachable: lookups of anything else fail at once instead of hanging.
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def ns_exec(self, ns: str, *args: str, check: bool = True, **kwargs: Any
                ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *args, check=check, **kwargs)

    def start_upstream(self) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert(*TARGET_HOSTS, *MORE_API_HOSTS, OTHER_HOST, SHARED_HOST,
                             "*.openai.azure.com")
        self.upstream_ca_pem = self.workdir / "upstream-ca.pem"
        ca.cert_pem.write_to_path(str(self.upstream_ca_pem))
        key_and_chain = self.workdir / "upstream-server.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(key_and_chain))
        self.upstream_log = self.workdir / "upstream.jsonl"
        self.upstream_log.touch()
        self._upstream = subprocess.Popen(
            ["ip", "netns", "exec", self.upstream_ns, sys.executable,
             str(TESTS_DIR / "fake_upstream.py"), "--cert", str(key_and_chain),
             "--key", str(key_and_chain), "--log", str(self.upstream_log),
             *(arg for address in (self.upstream_v4, f"[{self.upstream_v6}]", self.other_v4,
                                   f"[{self.other_v6}]") for arg in ("--bind", f"{address}:443"))],
            stderr=open(self.workdir / "upstream.stderr", "wb"),  # noqa: SIM115 - the child keeps it
        )
        self._wait_for_upstream()

    def _wait_for_upstream(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            probe = self.curl("https://api.anthropic.com/ready", cacert=self.upstream_ca_pem,
                              check=False)
            if probe.returncode == 0:
                self.upstream_log.write_text("")
                return
            time.sleep(0.2)
        raise RuntimeError("fake upstream did not start: "
                           + (self.workdir / "upstream.stderr").read_text())

    def destroy(self) -> None:
        if self._upstream is not None:
            self._upstream.terminate()
            try:
                self._upstream.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._upstream.kill()
        for ns in (self.client_ns, self.upstream_ns):
            if ns:
                sh("ip", "netns", "del", ns, check=False)
                shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)

    # --- clients, all inside the client namespace and with no proxy variables ---

    def client(self, *args: str, check: bool = True, timeout: float = 60,
               env: dict[str, str] | None = None, input: str | None = None,
               ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.client_ns, *args, check=check, timeout=timeout,
                  env=clean_env(env), input=input)

    def curl(self, url: str, cacert: Path, *extra: str, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        result = self.client("curl", "-sS", "--max-time", "20", "--cacert", str(cacert), *extra,
                             url, check=False)
        if check and result.returncode == CURL_BAD_CERT:  # whose certificate, and was it redirected?
            seen = self.client("sh", "-c", f"curl -sSvk --max-time 5 {url} 2>&1 >/dev/null | "
                               "grep -iE 'subject:|issuer:|connected'", check=False).stdout
            rules = self.ns_exec(self.client_ns, "nft", "list", "ruleset", check=False).stdout
            raise AssertionError(f"curl {url} exited {CURL_BAD_CERT}: {result.stderr}\n"
                                 f"a second try saw:\n{seen}\nthe client's rules:\n{rules}")
        if check and result.returncode != 0:
            raise AssertionError(f"curl {url} exited {result.returncode}:\n{result.stderr}")
        return result

    def python(self, code: str, env: dict[str, str] | None = None, check: bool = True
               ) -> subprocess.CompletedProcess[str]:
        return self.client(sys.executable, "-c", textwrap.dedent(code), env=env, check=check)

    def upstream_requests(self) -> list[dict[str, Any]]:
        text = self.upstream_log.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def nft_tables(self) -> str:
        return self.ns_exec(self.client_ns, "nft", "list", "tables").stdout

    def iptables_rules(self) -> str:
        rules = ""
        for save in ("iptables-save", "ip6tables-save"):
            rules += self.ns_exec(self.client_ns, save, check=False).stdout
        return rules


@dataclass
class Daemon:
    """One `llmtap run` in the client namespace."""

    bed: Testbed
    root: Path
    proc: subprocess.Popen[bytes]
    config_path: Path

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def records_dir(self) -> Path:
        return self.root / "records"

    @property
    def ca_pem(self) -> Path:
        return self.state_dir / "ca" / "llmtap-ca.pem"

    @property
    def stderr_path(self) -> Path:
        return self.root / "daemon.stderr"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def llmtap(self, *args: str, check: bool = True, input: str | None = None,
               ) -> subprocess.CompletedProcess[str]:
        """A CLI command against this daemon's config (every command takes --config)."""
        return self.bed.client(LLMTAP, *args, "--config", str(self.config_path), check=check,
                               input=input)

    def status(self) -> dict[str, Any]:
        return json.loads(self.llmtap("status", "--json").stdout)

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"llmtap exited {self.proc.returncode}: {self.stderr()}")
            result = self.llmtap("status", "--json", check=False)
            if result.returncode == 0:
                status = json.loads(result.stdout)
                if status.get("running") and status.get("rules_present"):
                    return status
            time.sleep(0.2)
        raise AssertionError(f"llmtap not ready in {timeout}s: {self.stderr()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def records(self, expected: int = 0, timeout: float = 30) -> list[dict[str, Any]]:
        """The JSON records, waiting (the writer is asynchronous) until there are `expected`."""
        deadline = time.monotonic() + timeout
        while True:
            records = [json.loads(p.read_text()) for p in sorted(self.records_dir.glob("*.json"))]
            if len(records) >= expected or time.monotonic() > deadline:
                return records
            time.sleep(0.1)


def make_workdir() -> Path:
    """A directory the unprivileged worker can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="llmtap-test-", dir="/tmp"))
    path.chmod(0o755)
    return path


def write_config(path: Path, root: Path, bed: Testbed, extra_toml: str = "",
                 extra_hosts: tuple[str, ...] = (), upstream: dict[str, Any] | None = None,
                 **redirect: Any) -> Path:
    """The daemon's config; `extra_toml` (whole tables, e.g. "[dlp]\n...") is appended;
    `upstream`: keys of [upstream] besides extra_ca (e.g. pool_idle_s)."""
    settings = {"backend": "auto", "scope": "targets", "proxy_port": 8443,
                "dns_refresh_max_s": 30, **redirect}
    lines = [
        f'state_dir = "{root / "state"}"',
        f'records_dir = "{root / "records"}"',
        f'run_dir = "{root / "run"}"',
        "[redirect]",
        *(f"{key} = {json.dumps(value)}" for key, value in settings.items()),
        "[targets]",
        f"hosts = {json.dumps(list(TARGET_HOSTS))}",
        f"extra_hosts = {json.dumps(list(extra_hosts))}",
        "[upstream]",
        f'extra_ca = "{bed.upstream_ca_pem}"',
        *(f"{key} = {json.dumps(value)}" for key, value in (upstream or {}).items()),
    ]
    path.write_text("\n".join(lines) + "\n" + textwrap.dedent(extra_toml) + "\n")
    return path


def start_daemon(bed: Testbed, extra_toml: str = "", run_args: tuple[str, ...] = (),
                 prefix: tuple[str, ...] = (), extra_hosts: tuple[str, ...] = (),
                 upstream: dict[str, Any] | None = None, **redirect: Any) -> Daemon:
    """`prefix` goes before the command (e.g. prlimit with its options); `extra_hosts` are
    targets besides TARGET_HOSTS (e.g. some of MORE_API_HOSTS)."""
    root = make_workdir()
    config_path = write_config(root / "config.toml", root, bed, extra_toml, extra_hosts,
                               upstream, **redirect)
    stderr = open(root / "daemon.stderr", "wb")  # noqa: SIM115 - the daemon keeps writing to it
    proc = subprocess.Popen(
        ["ip", "netns", "exec", bed.client_ns, *prefix, LLMTAP, "run",
         "--config", str(config_path), *run_args],
        stdout=stderr, stderr=stderr, env=clean_env(),
    )
    return Daemon(bed, root, proc, config_path)


def wait_for(condition: Any, timeout: float = 10, every: float = 0.05) -> bool:
    """Whether `condition()` came true within `timeout` seconds (asked every `every`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(every)
    return bool(condition())


@contextlib.contextmanager
def running_daemon(bed: Testbed, extra_toml: str = "", **kwargs: Any) -> Iterator[Daemon]:
    """A ready daemon (start_daemon's arguments), stopped after, and the client namespace left
    without llmtap's table whatever happened (for a module's shared daemon)."""
    daemon = start_daemon(bed, extra_toml, **kwargs)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
        bed.ns_exec(bed.client_ns, "nft", "delete", "table", "inet", "llmtap", check=False)
