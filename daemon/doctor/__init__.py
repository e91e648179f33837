"""`llmtap doctor`: is every part in place, and does every runtime on this machine trust the CA?

Runtime checks are real TLS handshakes through the tap to a target, with the environment a new
login shell gets (this one's plus /etc/profile.d/llmtap.sh): a handshake proves trust only when
the certificate the runtime accepted was issued by llmtap's CA, so each probe reports the issuer.
Every failure comes with a one-line fix.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtap import ca, control, hostpatterns
from llmtap.config import Config
from llmtap.doctor.probes import (
    ISSUER,
    JAVA_PROBE,
    NODE_PROBE,
    PROBE_KEY,
    PROBE_PATH,
    PYTHON_PROBE,
    REACHED_API,
    TLS_TROUBLE,
    node_interpreter,
    parse_json_line,
    run_with_env,
)
from llmtap.errors import LlmtapError, UsageError
from llmtap.install.linux import LinuxInstaller
from llmtap.install.runtime_env import parse_profile_script
from llmtap.platform.linux.app_trust import NssTrustStore
from llmtap.platform.linux.keeper import DetachedService
from llmtap.platform.linux.systemd import SystemdService
from llmtap.platform.linux.trust import Which
from llmtap.platform.runner import Completed

if TYPE_CHECKING:
    from llmtap.install.macos import MacInstaller
    from llmtap.install.windows import WindowsInstaller

ProbeRunner = Callable[[list[str], dict[str, str]], Completed]

@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | fail | warn | skip
    detail: str
    fix: str = ""


def ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "fail", detail, fix)


class Doctor:
    def __init__(self, config: Config, explicit_config: str | None = None,
                 runner: ProbeRunner = run_with_env, which: Which = shutil.which,
                 env: dict[str, str] | None = None, host: str | None = None,
                 platform: str | None = None, windows: WindowsInstaller | None = None,
                 mac: MacInstaller | None = None) -> None:
        self.config = config
        self.installer = LinuxInstaller(config, explicit_config)
        self.layout = self.installer.layout
        self.windows: WindowsInstaller | None = windows
        if self.windows is None and (platform or sys.platform) == "win32":
            from llmtap.install.windows import WindowsInstaller

            self.windows = WindowsInstaller(config, explicit_config)
        self.mac: MacInstaller | None = mac
        if self.mac is None and (platform or sys.platform) == "darwin":
            from llmtap.install.macos import MacInstaller

            self.mac = MacInstaller(config, explicit_config)
        if self.mac is not None:
            from llmtap.doctor import macos

            which = macos.without_stubs(which, self.mac.system.runner)
        self.runner = runner
        self.which = which
        self.base_env = dict(os.environ if env is None else env)
        self.host = host
        self.status: dict[str, Any] | None = None
        self.unknown = False  # whether the daemon could not be asked (no permission)

    # --- the checks ---

    def run(self) -> list[Check]:
        checks = [self.check_service()]
        if self.status and self.status.get("running"):
            checks += [self.check_rules(), self.check_targets()]
        checks += [self.check_ca_coverage(), self.check_os_trust(), *self.check_nss(),
                   self.check_environment()]
        if self.windows is not None:
            from llmtap.doctor import windows

            checks.append(windows.firewall(self.windows))
        if self.mac is not None:  # the account, pf, and the GUI apps' environment
            from llmtap.doctor import macos

            checks += macos.extra(self.mac, self.status)
        checks += self.check_runtimes()
        return checks

    def check_service(self) -> Check:
        try:
            self.status = control.request(self.config.control_socket, {"cmd": "status"})
        except LlmtapError as exc:
            self.unknown = True  # not allowed to ask: the handshakes below still tell
            return Check("service", "warn", f"cannot ask the daemon: {exc}",
                         "run `llmtap doctor` from an elevated terminal" if self.windows else
                         "run `sudo llmtap doctor`, or join group " + self.config.service_user)
        if self.windows is not None:
            from llmtap.doctor import windows

            return windows.service(self.windows, self.status)
        if self.mac is not None:
            from llmtap.doctor import macos

            return macos.service(self.mac, self.status)
        managed = self.managed_service()
        if not (self.status and self.status.get("running")):
            fix = ("sudo systemctl start llmtap" if isinstance(managed, SystemdService)
                   else "sudo llmtap install")
            return fail("service", "the llmtap daemon is not running", fix)
        pid = self.status.get("pid")
        if isinstance(managed, SystemdService):
            return ok("service", f"running under systemd ({managed.unit_name}, pid {pid})")
        if isinstance(managed, DetachedService):
            keeper = (managed.pids() or (0, 0))[0]
            return ok("service", f"running detached (keeper pid {keeper}, daemon pid {pid}); "
                                 "no systemd here, so it does not start at boot")
        return Check("service", "warn", f"running (pid {pid}) but not as a service",
                     "sudo llmtap install (starts it at boot and restarts it on failure)")

    def managed_service(self) -> SystemdService | DetachedService | None:
        systemd = self.installer.service("systemd")
        if isinstance(systemd, SystemdService) and systemd.unit_file.exists():
            return systemd
        detached = self.installer.service("detached")
        if isinstance(detached, DetachedService) and detached.is_running():
            return detached
        return None

    def check_rules(self) -> Check:
        assert self.status is not None
        s = self.status
        if s.get("rules_present"):
            return ok("rules", f"{s.get('backend')} redirect in place (scope {s.get('scope')}, "
                               f"ports {','.join(map(str, s.get('ports', [])))} -> {s.get('proxy_port')})")
        return fail("rules", "the redirect rules are missing", "sudo llmtap install (restarts the "
                    "service, which puts them back)")

    def check_targets(self) -> Check:
        assert self.status is not None
        targets: dict[str, list[str]] = self.status.get("targets", {})
        patterns = self.config.targets.host_set().patterns
        # A region pattern's names exist only where the service does: one resolving is enough.
        unresolved = [p.text for p in patterns if p.names and all(targets.get(n) == [] for n in p.names)]
        blind = self.config.targets.host_set().unresolvable
        if self.status.get("scope") == "targets" and blind:
            return fail("targets", f"no name is listed under {', '.join(blind)}: its connections "
                        "are not redirected", "list the names you use in targets.extra_hosts "
                        "(e.g. myresource.openai.azure.com), or set redirect.scope = \"all\"")
        if not unresolved:
            return ok("targets", f"{len(targets)} target hosts resolved")
        first = hostpatterns.parse(unresolved[0]).names[0]
        return fail("targets", f"{len(unresolved)} of {len(patterns)} do not resolve: "
                    f"{', '.join(unresolved)}", f"check DNS for them (`getent hosts {first}`); "
                    "llmtap retries on its own")

    def ca_cert(self) -> Path:
        public = self.windows.public_cert if self.windows else self.layout.public_cert
        return public if public.exists() else ca.public_cert_path(self.config.ca_dir)

    def check_ca_coverage(self) -> Check:
        cert = self.ca_cert()
        try:
            missing = ca.uncovered_hosts(cert, self.config.targets.all_hosts)
        except OSError:
            return fail("CA", f"no CA at {cert}", "sudo llmtap install")
        if missing:
            return fail("CA", f"the CA does not cover {', '.join(missing)}", "sudo llmtap ca rotate")
        return ok("CA", f"{cert} covers all {len(self.config.targets.all_hosts)} targets")

    def check_os_trust(self) -> Check:
        if self.mac is not None:
            from llmtap.doctor import macos

            return macos.keychain(self.mac, self.ca_cert())
        if self.windows is not None:
            cert = self.ca_cert()
            if cert.exists() and self.windows.store.is_trusted(cert):
                return ok("OS trust", "the CA is in the machine's Root store (certutil)")
            return fail("OS trust", "the CA is not in the machine's Root store",
                        "llmtap install (elevated)")
        try:
            store = self.installer.trust_store()
        except UsageError as exc:
            return Check("OS trust", "warn", str(exc), "trust the CA by hand: `llmtap ca path`")
        cert = self.ca_cert()
        if cert.exists() and store.is_trusted(cert):
            return ok("OS trust", f"the CA is in {store.bundle} ({store.name})")
        return fail("OS trust", f"the CA is not in {store.bundle}", "sudo llmtap install")

    def check_nss(self) -> list[Check]:
        if self.mac is not None:
            return []  # Chrome and Safari read the keychain; Firefox's own store is not managed
        if self.windows is not None:
            return [Check("NSS", "skip", "not checked on Windows (no NSS databases are managed)")]
        nss = self.installer.nss_store()
        if nss is None:
            return []
        cert = self.ca_cert()
        missing = [db for db in nss.databases
                   if not NssTrustStore([db], nss.runner).is_trusted(cert)]
        if missing:
            return [fail("NSS", f"{len(missing)} browser database(s) lack the CA, e.g. "
                         f"{missing[0].directory}", "sudo llmtap install (with certutil present)")]
        return [ok("NSS", f"the CA is in {len(nss.databases)} browser database(s)")]

    def session_values(self) -> dict[str, str]:
        if self.windows is not None:  # machine-wide variables, what a new session gets
            environment = self.windows.environment
            return {name: value for name in self.windows.env()
                    if (value := environment.get(name) or "")}
        if self.mac is not None:  # what a new zsh gets from /etc/zshenv
            from llmtap.doctor import macos

            return macos.shell_values(self.mac)
        try:
            return parse_profile_script(self.layout.profile_script.read_text())
        except OSError:
            return {}

    def check_environment(self) -> Check:
        values = self.session_values()
        script = ("the machine environment" if self.windows else "/etc/zshenv" if self.mac
                  else self.config.install.profile_script)
        if not values:
            return fail("environment", f"{script} is missing or empty: Node, Python SDKs and Codex will not "
                        "trust the CA", "llmtap install (elevated)" if self.windows
                        else "sudo llmtap install")
        stale = [name for name, value in values.items() if self.base_env.get(name) != value]
        if stale:
            return Check("environment", "warn", f"this shell predates {script} (no "
                         f"{', '.join(stale)}); the probes below use a new session's values",
                         "open a new terminal" if self.windows else
                         f"open a new shell or run `. {script}`")
        return ok("environment", f"{', '.join(values)} set from {script}")

    # --- runtimes ---

    def probe_env(self) -> dict[str, str]:
        return {**self.base_env, **self.session_values()}

    def target_host(self) -> str:
        if self.host:
            return self.host
        targets: dict[str, list[str]] = (self.status or {}).get("targets", {})
        names = self.config.targets.host_set().resolvable  # a wildcard is no name to connect to
        for host in names:
            if targets.get(host):
                return host
        return names[0] if names else self.config.targets.all_hosts[0]

    def check_runtimes(self) -> list[Check]:
        tapping = bool(self.status and self.status.get("running") and self.status.get("rules_present"))
        if not (tapping or self.unknown):
            return [Check("runtimes", "skip", "no handshakes: the tap is not running")]
        host = self.target_host()
        python = "python" if self.windows else "python3"  # python3.exe is often the Store's stub
        probes: list[tuple[str, str, Callable[[str, str], Check]]] = [
            ("curl", "curl", self.probe_curl), ("python3", python, self.probe_python),
            ("node", "node", self.probe_node), ("claude", "claude", self.probe_claude),
            ("codex", "codex", self.probe_codex), ("java", "java", self.probe_java)]
        checks = []
        for name, binary, probe in probes:
            path = self.which(binary)
            checks.append(probe(path, host) if path else Check(name, "skip", "not installed"))
        return checks

    def run_probe(self, argv: list[str], env: dict[str, str] | None = None) -> Completed:
        return self.runner(argv, env or self.probe_env())

    def verdict(self, name: str, result: dict[str, Any], host: str, fix: str) -> Check:
        if result.get("ok") and ISSUER in str(result.get("issuer", "")):
            return ok(name, f"trusts the CA (TLS handshake with {host} through the tap)")
        if result.get("ok"):
            return fail(name, f"{host} answered with a certificate from {result.get('issuer')!r}: "
                        "the connection was not intercepted", "check `llmtap status`: the target's "
                        "addresses must be redirected")
        if result.get("network"):
            return fail(name, f"no TLS connection to {host}: {result.get('error')}",
                        "check `llmtap status` and the network")
        return fail(name, f"does not trust the CA ({result.get('error')})", fix)

    def probe_curl(self, curl: str, host: str) -> Check:
        if self.windows is not None:
            return Check("curl", "skip", "not checked on Windows: curl.exe uses Schannel (the "
                         "Root store, checked above) and shows no issuer")
        result = self.run_probe([curl, "-sS", "-o", "/dev/null", "-v", "--max-time", "15",
                                 f"https://{host}{PROBE_PATH}"])
        issuer = next((line.split("issuer:", 1)[1].strip() for line in result.stderr.splitlines()
                       if "issuer:" in line), "")
        verify_failed = result.returncode in (35, 60, 77)
        error = next((line for line in reversed(result.stderr.splitlines())
                      if line.startswith("curl: (")), result.reason())
        outcome: dict[str, Any] = {"ok": result.ok, "issuer": issuer, "error": error,
                                   "network": not verify_failed}
        return self.verdict("curl", outcome, host, "sudo llmtap install (OS store and CURL_CA_BUNDLE)")

    def probe_python(self, python: str, host: str) -> Check:
        result = self.run_probe([python, "-c", PYTHON_PROBE, host])
        outcome = parse_json_line(result)
        name = f"python3 ({outcome.get('source', 'certifi')})"
        return self.verdict(name, outcome, host, "open a new shell: SSL_CERT_FILE comes from "
                            f"{self.config.install.profile_script} (sudo llmtap install writes it)")

    def probe_node(self, node: str, host: str, name: str = "node") -> Check:
        result = self.run_probe([node, "-e", NODE_PROBE, host])
        return self.verdict(name, parse_json_line(result), host, "open a new shell: "
                            "NODE_EXTRA_CA_CERTS comes from "
                            f"{self.config.install.profile_script} (sudo llmtap install writes it)")

    def probe_claude(self, claude: str, host: str) -> Check:
        node = node_interpreter(Path(claude), self.which)
        if node is not None:  # Claude Code on Node: its trust is that interpreter's
            return self.probe_node(str(node), "api.anthropic.com" if self.is_target(
                "api.anthropic.com") else host, name="claude (Node)")
        return self.probe_binary("claude", [claude, "-p", "llmtap doctor probe"],
                                 {"ANTHROPIC_API_KEY": PROBE_KEY})

    def probe_codex(self, codex: str, host: str) -> Check:
        """Codex is a Rust binary (npm's `codex` only launches it): it is run for real."""
        return self.probe_binary("codex", [codex, "exec", "--skip-git-repo-check",
                                           "llmtap doctor probe"],
                                 {"OPENAI_API_KEY": PROBE_KEY, "CODEX_API_KEY": PROBE_KEY})

    def probe_java(self, java: str, host: str) -> Check:
        """JetBrains IDEs, Gradle and every JVM tool trust Java's keystore, not the OS store."""
        with tempfile.TemporaryDirectory(prefix="llmtap-doctor-") as folder:
            source = Path(folder) / "LlmtapProbe.java"
            source.write_text(JAVA_PROBE)
            result = self.run_probe([java, str(source), host])
        return self.verdict("java", parse_json_line(result), host, "sudo llmtap install (it adds the "
                            "CA to Java's keystore when keytool is there)")

    def is_target(self, host: str) -> bool:
        return self.config.targets.host_set().matches(host)

    def probe_binary(self, name: str, argv: list[str], keys: dict[str, str]) -> Check:
        """A native CLI (Bun-built claude, Rust codex) run for real with a dummy key in an empty
        home: it can only get an authentication error back, and only over a TLS connection it
        trusted. Any real credentials it has stay unused."""
        with tempfile.TemporaryDirectory(prefix="llmtap-doctor-") as home:
            env = {**self.probe_env(), **keys, "HOME": home, "CODEX_HOME": home,
                   "CLAUDE_CONFIG_DIR": home, "XDG_CONFIG_HOME": home}
            result = self.run_probe(argv, env)
        output = f"{result.stdout}\n{result.stderr}"
        last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")
        if REACHED_API.search(output):
            return ok(name, "reached its API through the tap (a dummy key was refused there), so "
                            "it trusts the CA")
        if TLS_TROUBLE.search(output):
            return fail(name, f"does not trust the CA: {last[:160]}",
                        f"open a new shell (variables from {self.config.install.profile_script})")
        return Check(name, "warn", f"inconclusive: {last[:160] or f'exit code {result.returncode}'}",
                     "run it once yourself and look for certificate errors")


def render(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"{check.status.upper() if check.status == 'fail' else check.status:5} "
                     f"{check.name}: {check.detail}")
        if check.fix and check.status in ("fail", "warn"):
            lines.append(f"      fix: {check.fix}")
    failures = sum(c.status == "fail" for c in checks)
    lines.append(f"{failures} problem(s) found" if failures else "all good")
    return "\n".join(lines)


def as_json(checks: list[Check]) -> str:
    return json.dumps([asdict(c) for c in checks], indent=2)
