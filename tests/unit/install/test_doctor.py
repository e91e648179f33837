"""`llmtap doctor`'s verdicts from what each runtime reported (the real handshakes are in
tests/e2e/test_install_e2e.py): trusted only when the accepted certificate is llmtap's."""

from __future__ import annotations

import json
from pathlib import Path

from llmtap.config import Config, InstallConfig, TargetsConfig
from llmtap.doctor import Doctor, parse_json_line, render
from llmtap.platform.runner import Completed

RUNNING = {"running": True, "rules_present": True, "pid": 7, "backend": "nft", "scope": "targets",
           "ports": [443], "proxy_port": 8443,
           "targets": {"api.anthropic.com": ["10.0.0.2"], "api.openai.com": []}}


Calls = list[tuple[list[str], dict[str, str]]]


def doctor(tmp_path: Path, answers: dict[str, Completed]) -> tuple[Doctor, Calls]:
    calls: Calls = []

    def runner(argv: list[str], env: dict[str, str]) -> Completed:
        calls.append((argv, env))
        return answers.get(Path(argv[0]).name, Completed(127, "", "not found"))

    profile = tmp_path / "llmtap.sh"
    profile.write_text("export SSL_CERT_FILE='/etc/llmtap/ca-bundle.pem'\n")
    config = Config(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    targets=TargetsConfig(hosts=("api.anthropic.com", "api.openai.com")),
                    install=InstallConfig(profile_script=profile))
    found = {name: f"/usr/bin/{name}" for name in answers}
    d = Doctor(config, runner=runner, which=found.get, env={"PATH": "/usr/bin"})
    d.status = RUNNING
    return d, calls


def python_says(**result: object) -> Completed:
    return Completed(0, json.dumps(result) + "\n")


def test_trusted_only_when_the_issuer_is_llmtap(tmp_path):
    d, calls = doctor(tmp_path, {
        "python3": python_says(ok=True, issuer="llmtap local CA", source="SSL_CERT_FILE"),
        "node": python_says(ok=True, issuer="Some Public CA"),
    })
    checks = {c.name: c for c in d.check_runtimes()}
    assert checks["python3 (SSL_CERT_FILE)"].status == "ok"
    assert checks["node"].status == "fail" and "was not intercepted" in checks["node"].detail
    assert checks["curl"].status == "skip"
    argv, env = calls[0]
    assert argv[-1] == "api.anthropic.com"  # the first target that resolved
    assert env["SSL_CERT_FILE"] == "/etc/llmtap/ca-bundle.pem"  # a new session's environment


def test_untrusted_and_unreachable_have_different_fixes(tmp_path):
    d, _ = doctor(tmp_path, {
        "python3": python_says(ok=False, error="unable to get local issuer certificate",
                               source="certifi"),
        "node": python_says(ok=False, error="ECONNREFUSED", network=True),
    })
    checks = {c.name: c for c in d.check_runtimes()}
    python = checks["python3 (certifi)"]
    assert python.detail == "does not trust the CA (unable to get local issuer certificate)"
    assert python.fix.startswith("open a new shell: SSL_CERT_FILE comes from")
    assert checks["node"].detail == "no TLS connection to api.anthropic.com: ECONNREFUSED"


def test_native_cli_probe_classification(tmp_path):
    outputs = {
        "ok": "ERROR: unexpected status 401 Unauthorized: Incorrect API key provided",
        "fail": "error sending request: invalid peer certificate: UnknownIssuer",
        "warn": "something else entirely",
    }
    for status, text in outputs.items():
        d, calls = doctor(tmp_path, {"codex": Completed(1, text)})
        [check] = [c for c in d.check_runtimes() if c.name == "codex"]
        assert check.status == status, (status, check)
        argv, env = calls[0]
        assert argv[1:3] == ["exec", "--skip-git-repo-check"]
        assert env["CODEX_API_KEY"] == env["OPENAI_API_KEY"] == "llmtap-doctor-probe-not-a-key"
        assert env["HOME"] == env["CODEX_HOME"] != str(Path.home())


def test_no_handshake_without_the_tap_and_render(tmp_path):
    d, calls = doctor(tmp_path, {"curl": Completed(0)})
    d.status = {"running": False}
    checks = d.check_runtimes()
    assert [(c.name, c.status) for c in checks] == [("runtimes", "skip")] and calls == []
    assert render(checks) == (
        "skip  runtimes: no handshakes: the tap is not running\nall good")


def test_unparseable_probe_output_is_a_failure():
    assert parse_json_line(Completed(1, "Traceback...\n", "boom"))["ok"] is False
