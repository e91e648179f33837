"""Linux trust stores (the exact commands per distribution, a real NSS database) and the systemd
unit (rendered, then checked by `systemd-analyze verify`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from llmtap.ca import create_ca
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.linux import app_trust, trust
from llmtap.platform.linux.app_trust import NssDatabase, NssTrustStore, find_nss_databases
from llmtap.platform.linux.systemd import UnitSpec, quote_exec, render_unit
from llmtap.platform.linux.trust import (
    ArchTrustStore,
    DebianTrustStore,
    FedoraTrustStore,
    detect_trust_store,
    parse_trust_list,
)
from llmtap.platform.runner import Completed, SubprocessRunner

CA_PEM = create_ca(("api.anthropic.com",))[1]


class Recorder:
    def __init__(self, answers: dict[str, Completed] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.answers = answers or {}

    def __call__(self, argv: list[str], stdin: str | None = None) -> Completed:
        self.calls.append(argv)
        return self.answers.get(" ".join(argv), self.answers.get(argv[0], Completed(0)))


def os_release(root: Path, text: str) -> Path:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/os-release").write_text(text)
    return root


@pytest.mark.parametrize(("text", "store"), [
    ('ID=ubuntu\nID_LIKE=debian\nPRETTY_NAME="Ubuntu 24.04 LTS"\n', DebianTrustStore),
    ('ID=pop\nID_LIKE="ubuntu debian"\n', DebianTrustStore),
    ('ID="rocky"\nID_LIKE="rhel centos fedora"\n', FedoraTrustStore),
    ("ID=fedora\n", FedoraTrustStore),
    ("ID=manjaro\nID_LIKE=arch\n", ArchTrustStore),
    ("ID=somethingnew\nID_LIKE=arch\n", ArchTrustStore),
])
def test_distribution_detection(tmp_path, text, store):
    root = os_release(tmp_path, text)
    assert type(detect_trust_store(root=root, which=lambda n: "/usr/bin/" + n)) is store


def test_unsupported_distribution_and_explicit_choice(tmp_path):
    root = os_release(tmp_path, 'ID=gentoo\nPRETTY_NAME="Gentoo Linux"\n')
    with pytest.raises(UsageError, match="unsupported distribution 'Gentoo Linux'"):
        detect_trust_store(root=root, which=lambda n: "/x")
    forced = detect_trust_store("fedora", root=root, which=lambda n: "/x")
    assert type(forced) is FedoraTrustStore
    with pytest.raises(UsageError, match="update-ca-trust is missing: install the ca-certificates "
                                         r"package \(dnf install ca-certificates\)"):
        detect_trust_store("fedora", root=root, which=lambda n: None)


def test_fedora_commands_and_files(tmp_path):
    cert = tmp_path / "ca.pem"
    cert.write_bytes(CA_PEM)
    runner = Recorder()
    store = FedoraTrustStore(runner, tmp_path)
    store.trust(cert)
    anchor = tmp_path / "etc/pki/ca-trust/source/anchors/llmtap.pem"
    assert anchor.read_bytes() == CA_PEM and oct(anchor.stat().st_mode & 0o777) == "0o644"
    assert runner.calls == [["update-ca-trust", "extract"]]
    assert not store.is_trusted(cert)  # the bundle (not extracted here) decides
    bundle = tmp_path / "etc/pki/tls/certs/ca-bundle.crt"
    bundle.parent.mkdir(parents=True)
    bundle.write_bytes(create_ca(("x.org",))[1] + CA_PEM)
    assert store.is_trusted(cert)
    store.untrust()
    assert not anchor.exists() and runner.calls[-1] == ["update-ca-trust", "extract"]
    store.untrust()  # nothing anchored: nothing to run
    assert len(runner.calls) == 2


TRUST_LIST = """\
pkcs11:id=%AA%BB;type=cert
    type: certificate
    label: ISRG Root X1
    trust: anchor
    category: authority

pkcs11:id=%01%02;type=cert
    type: certificate
    label: llmtap local CA
    trust: anchor
    category: authority

pkcs11:id=%03%04;type=cert
    type: certificate
    label: llmtap local CA
    trust: anchor
    category: authority
"""


def test_arch_uses_trust_anchor_and_removes_every_llmtap_ca(tmp_path):
    cert = tmp_path / "ca.pem"
    cert.write_bytes(CA_PEM)
    runner = Recorder({"trust list --filter=ca-anchors": Completed(0, TRUST_LIST)})
    store = ArchTrustStore(runner, tmp_path)
    store.trust(cert)
    assert runner.calls == [["trust", "anchor", "--store", str(cert)]]
    assert store.is_anchored()
    store.untrust()
    assert runner.calls[-2:] == [["trust", "anchor", "--remove", "pkcs11:id=%01%02;type=cert"],
                                 ["trust", "anchor", "--remove", "pkcs11:id=%03%04;type=cert"]]
    assert parse_trust_list(TRUST_LIST, "nothing") == []


def test_debian_failure_is_one_line_and_rooted_commands_stay_in_the_tree(tmp_path):
    cert = tmp_path / "ca.pem"
    cert.write_bytes(CA_PEM)
    runner = Recorder({"update-ca-certificates": Completed(1, "", "E: something broke\n")})
    with pytest.raises(RuntimeFailure, match=r"^update-ca-certificates failed: E: something broke$"):
        DebianTrustStore(runner, tmp_path).trust(cert)
    assert all(arg.startswith(str(tmp_path)) for arg in runner.calls[0][2::2])
    assert DebianTrustStore(runner).update_command() == ["update-ca-certificates"]


@pytest.mark.skipif(not shutil.which("certutil"), reason="needs certutil (libnss3-tools)")
def test_real_nss_database_trust_and_untrust(tmp_path):
    """certutil on a real database: added, found by content, removed (older CAs too)."""
    home = tmp_path / "home"
    nssdb = home / ".pki/nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True)
    firefox = home / ".mozilla/firefox/abc.default-release"
    firefox.mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{firefox}", "--empty-password"], check=True)
    (home / ".mozilla/firefox/empty-profile").mkdir()  # no cert9.db: left alone
    databases = find_nss_databases([(os.getuid(), os.getgid(), home)])
    assert [db.directory for db in databases] == [nssdb, firefox]
    old, new = tmp_path / "old.pem", tmp_path / "new.pem"
    old.write_bytes(create_ca(("api.openai.com",))[1])
    new.write_bytes(CA_PEM)
    store = NssTrustStore(databases, SubprocessRunner(), as_root=False)
    store.trust(old)
    store.trust(new)  # a rotation: the old one is replaced, not kept beside it
    assert store.is_trusted(new) and not store.is_trusted(old)
    listing = subprocess.run(["certutil", "-L", "-d", f"sql:{nssdb}"], capture_output=True,
                             text=True).stdout
    assert listing.count("llmtap local CA") == 1 and "C,," in listing
    store.untrust()
    assert store.holders() == [] and not store.is_trusted(new)


def test_nss_runs_as_the_database_owner_when_root():
    runner = Recorder()
    store = NssTrustStore([NssDatabase(Path("/home/a/.pki/nssdb"), 1000, 1000),
                           NssDatabase(Path("/root/.pki/nssdb"), 0, 0)], runner, as_root=True)
    assert store.command(store.databases[0], "-L") == [
        "setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--", "certutil", "-d",
        "sql:/home/a/.pki/nssdb", "-L"]
    assert store.command(store.databases[1], "-L") == ["certutil", "-d", "sql:/root/.pki/nssdb",
                                                        "-L"]


def test_os_release_fallback_and_local_homes(tmp_path):
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/os-release").write_text("ID=debian\n")
    assert trust.read_os_release(tmp_path) == trust.OsRelease("debian", (), "unknown")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(
        "root:x:0:0::/root:/bin/sh\nsvc:x:999:999::/var/lib/svc:/usr/sbin/nologin\n"
        "bob:x:1001:1001::/home/bob:/bin/sh\nbroken line\n")
    assert app_trust.local_homes(tmp_path) == [(0, 0, tmp_path / "root"),
                                           (1001, 1001, tmp_path / "home/bob")]


# --- the systemd unit ----------------------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    unit = tmp_path / "llmtap.service"
    unit.write_text(unit_text)
    return subprocess.run([SYSTEMD_ANALYZE or "systemd-analyze", "verify", str(unit)],
                          capture_output=True, text=True, timeout=60)


def hardened_spec(command: str) -> UnitSpec:
    return UnitSpec(
        exec_start=[command, "run", "--config", "/etc/llmtap/config.toml"],
        exec_stop_post=[command, "cleanup", "--config", "/etc/llmtap/config.toml"],
        read_write_paths=(Path("/var/lib/llmtap"), Path("/var/lib/llmtap/records"),
                          Path("/run/llmtap")),
        run_dir=Path("/run/llmtap"), reads=(Path(command), Path("/etc/llmtap/config.toml")))


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="needs systemd-analyze (package systemd)")
def test_unit_is_hardened_and_passes_systemd_analyze_verify(tmp_path):
    text = render_unit(hardened_spec("/usr/bin/true"))
    result = verify(text, tmp_path)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "llmtap.service" in line] == []
    for line in (
        "ExecStart=/usr/bin/true run --config /etc/llmtap/config.toml",
        "ExecStopPost=/usr/bin/true cleanup --config /etc/llmtap/config.toml",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_SETUID CAP_SETGID CAP_CHOWN "
        "CAP_FOWNER CAP_DAC_OVERRIDE CAP_KILL",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_SETUID CAP_SETGID CAP_CHOWN "
        "CAP_FOWNER CAP_DAC_OVERRIDE CAP_KILL",
        "NoNewPrivileges=yes", "ProtectSystem=strict",
        "ReadWritePaths=-/var/lib/llmtap -/var/lib/llmtap/records -/run/xtables.lock",
        "RuntimeDirectory=llmtap", "ProtectHome=yes", "PrivateTmp=yes",
        "Restart=on-failure", "RestartPreventExitStatus=2", "KillMode=mixed",
        "WantedBy=multi-user.target",
    ):
        assert f"\n{line}\n" in text, line


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="needs systemd-analyze (package systemd)")
def test_unit_for_an_llmtap_under_root_and_tmp_relaxes_only_what_it_must(tmp_path):
    """As on this machine: the venv's interpreter lives in /root (pyenv), the venv in /tmp."""
    command = str(Path(sys.executable).parent / "llmtap")
    spec = hardened_spec(command)
    spec = UnitSpec(spec.exec_start, spec.exec_stop_post, (*spec.read_write_paths[:2], Path("/srv/run")),
                    Path("/srv/run"), (Path(command), Path(os.path.realpath(sys.executable))))
    text = render_unit(spec)
    result = verify(text, tmp_path)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "llmtap.service" in line] == []
    home = "/root" in os.path.realpath(sys.executable)
    assert ("\nProtectHome=read-only\n" in text) == home
    assert ("\nPrivateTmp=no\n" in text) == command.startswith("/tmp/")
    assert "\nReadWritePaths=-/var/lib/llmtap -/var/lib/llmtap/records -/srv/run -/run/xtables.lock\n" in text
    assert "RuntimeDirectory=" not in text.replace("# RuntimeDirectory", "")


def test_exec_quoting():
    assert quote_exec(["/opt/llm tap/llmtap", "run", "50%", "$HOME", 'a"b']) == (
        '"/opt/llm tap/llmtap" run 50%% $$HOME "a\\"b"')
