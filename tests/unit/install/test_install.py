"""`llmtap install` / `uninstall` / `ca rotate` against a temporary root: exact files, modes and
commands, rollback at every step, idempotence, and refusals that change nothing.

Commands go through a recording runner: useradd/userdel/groupdel run for real (with --prefix, on
the tree's own /etc/passwd), update-ca-certificates and certutil are simulated on the tree. The
detached service is real: a keeper process runs a stand-in for `llmtap run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from llmtap import cli
from llmtap.ca import create_ca
from llmtap.config import load_config
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.install.engine import unremoved
from llmtap.install.linux import LinuxInstaller
from llmtap.install.linux_system import System
from llmtap.install.manifest import MANIFEST, Manifest
from llmtap.platform.linux.keeper import DetachedService, Keeper, KeeperSpec, process_alive
from llmtap.platform.linux.trust import PEM_BLOCK
from llmtap.platform.linux.users import create_system_user, useradd_command
from llmtap.platform.runner import Completed, SubprocessRunner

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to the service user)")

BASE_ROOTS = create_ca(("example.org",), common_name="some public root")[1]
ANCHOR_DIR = "usr/local/share/ca-certificates"
# shadow-utils keeps a backup of the previous passwd/group/shadow on every change, as on any system
SHADOW_BACKUPS = ("etc/passwd-", "etc/group-", "etc/shadow-", "etc/gshadow-")


class Tree:
    """A temporary machine: a root tree, the daemon's own directories and a recording runner."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.state, self.run = base / "state", base / "run"
        self.calls: list[list[str]] = []
        self.fail_on: str | None = None
        self.nss: dict[str, set[bytes]] = {}  # simulated NSS databases: directory -> cert PEMs
        self._real = SubprocessRunner()
        self._populate()

    def _populate(self) -> None:
        etc = self.root / "etc"
        for sub in ("profile.d", "environment.d", "ssl/certs", "systemd/system"):
            (etc / sub).mkdir(parents=True)
        (self.root / ANCHOR_DIR).mkdir(parents=True)
        (self.root / "var/log").mkdir(parents=True)
        for name, lines in {
            "passwd": ["root:x:0:0:root:/root:/bin/bash",
                       "alice:x:1000:1000:Alice:/home/alice:/bin/bash",
                       "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"],
            "group": ["root:x:0:", "alice:x:1000:", "nogroup:x:65534:"],
            "shadow": ["root:*:19000:0:99999:7:::", "alice:*:19000:0:99999:7:::",
                       "nobody:*:19000:0:99999:7:::"],
            "gshadow": ["root:*::", "alice:!::", "nogroup:*::"],
        }.items():
            (etc / name).write_text("\n".join(lines) + "\n")
            for backup in SHADOW_BACKUPS:
                if backup == f"etc/{name}-":
                    (self.root / backup).write_text("\n".join(lines) + "\n")
        self.os_release("debian", "Debian GNU/Linux 12 (bookworm)")
        (etc / "ssl/certs/ca-certificates.crt").write_bytes(BASE_ROOTS)
        nssdb = self.root / "home/alice/.pki/nssdb"
        nssdb.mkdir(parents=True)
        (nssdb / "cert9.db").write_bytes(b"")
        self.nss[str(nssdb)] = set()
        self.fake_llmtap = self.base / "bin/llmtap"
        self.fake_llmtap.parent.mkdir()
        # Stands in for the real command under the keeper: `run` waits, `cleanup` notes its call.
        self.fake_llmtap.write_text(textwrap.dedent(f"""\
            #!/bin/sh
            [ "$1" = run ] && exec sleep 600
            echo "$@" >> {self.base}/cleanups
        """))
        self.fake_llmtap.chmod(0o755)

    def os_release(self, distro: str, pretty: str) -> None:
        (self.root / "etc/os-release").write_text(f'ID={distro}\nPRETTY_NAME="{pretty}"\n')

    def config(self, extra: str = "", **install: object) -> Path:
        settings = {"root": str(self.root), "command": str(self.fake_llmtap),
                    "service": "auto", **install}
        lines = [f'state_dir = "{self.state}"', f'records_dir = "{self.state / "records"}"',
                 f'run_dir = "{self.run}"', "[install]",
                 *(f"{k} = {json.dumps(v)}" for k, v in settings.items())]
        path = self.base / "config.toml"
        path.write_text("\n".join(lines) + "\n" + textwrap.dedent(extra))
        return path

    # --- the runner ---

    def __call__(self, argv: list[str], stdin: str | None = None) -> Completed:
        self.calls.append(argv)
        words = argv[argv.index("--") + 1:] if argv[0] == "setpriv" else argv
        if self.fail_on and words[0] == self.fail_on:
            self.fail_on = None  # once: the rollback's own call works
            return Completed(1, "", f"{words[0]}: simulated failure")
        if words[0] in ("useradd", "userdel", "groupdel"):
            return self._real(argv)
        if words[0] == "update-ca-certificates":
            anchors = sorted((self.root / ANCHOR_DIR).glob("*.crt"))
            bundle = BASE_ROOTS + b"".join(a.read_bytes() for a in anchors)
            (self.root / "etc/ssl/certs/ca-certificates.crt").write_bytes(bundle)
            return Completed(0, f"{len(anchors)} added\n")
        if words[0] == "certutil":
            return self._certutil(words)
        return Completed(0)

    def _certutil(self, argv: list[str]) -> Completed:
        db = self.nss[argv[argv.index("-d") + 1].removeprefix("sql:")]
        if "-A" in argv:
            db.add(Path(argv[argv.index("-i") + 1]).read_bytes())
        elif "-D" in argv:
            if not db:
                return Completed(255, "", "could not find certificate")
            db.pop()
        elif "-L" in argv:
            if not db:
                return Completed(255, "", "could not find certificate")
            return Completed(0, b"".join(db).decode() if "-a" in argv else "llmtap local CA C,,\n")
        return Completed(0)

    def system(self, **overrides: object) -> System:
        values: dict[str, object] = {
            "runner": self, "which": lambda name: f"/usr/bin/{name}", "systemd": lambda: False,
            "check_port": lambda port: None, "cleanup_rules": list,
            "wait_ready": lambda config, service: None}
        values.update(overrides)
        return System(**values)  # type: ignore[arg-type]

    def installer(self, config: Path, lines: list[str] | None = None, **system: object
                  ) -> LinuxInstaller:
        out = lines if lines is not None else []
        return LinuxInstaller(load_config(config), str(config), self.system(**system), out.append)

    def listing(self) -> dict[str, tuple[object, ...]]:
        """Every path under the tree and the daemon's directories: type, mode, owner, content."""
        entries: dict[str, tuple[object, ...]] = {}
        for top in (self.root, self.state, self.run):
            if not top.exists():
                continue
            for path in [top, *top.rglob("*")]:
                rel = str(path.relative_to(self.base))
                if rel.removeprefix("root/") in SHADOW_BACKUPS:
                    continue
                st = path.lstat()
                content = (hashlib.sha256(path.read_bytes()).hexdigest()
                           if stat.S_ISREG(st.st_mode) else "")
                entries[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, content)
        return entries

    def keeper(self) -> DetachedService:
        return DetachedService(self.run / "service.pid", self.root / "var/log/llmtap.log", [])

    def stop_leftovers(self) -> None:
        pids = self.keeper().pids()
        for pid in pids or ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


@pytest.fixture
def tree(tmp_path):
    machine = Tree(tmp_path)
    yield machine
    machine.stop_leftovers()


def mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o7777)


def owner(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid


def tree_uid(tree: Tree, name: str = "llmtap") -> tuple[int, int]:
    for line in (tree.root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"no user {name}")


def test_install_writes_exact_files_modes_and_commands(tree):
    config = tree.config()
    lines: list[str] = []
    done = tree.installer(config, lines).install()
    assert done == ["system user llmtap", "directories", "certificate authority", "public CA files",
                    "OS trust (update-ca-certificates)", "NSS databases (certutil)",
                    "runtime environment", "service (detached)", "install record"]
    uid, gid = tree_uid(tree)
    r = tree.root
    expected = {
        tree.state: ("0o700", (uid, gid)), tree.state / "records": ("0o750", (uid, gid)),
        tree.state / "ca": ("0o700", (uid, gid)),
        tree.state / "ca/mitmproxy-ca.pem": ("0o600", (uid, gid)),
        tree.state / "ca/llmtap-ca.pem": ("0o644", (uid, gid)),
        tree.state / "install.json": ("0o600", (0, 0)),
        tree.run: ("0o755", (0, 0)),
        r / "etc/llmtap": ("0o755", (0, 0)),
        r / "etc/llmtap/llmtap-ca.pem": ("0o644", (0, 0)),
        r / "etc/llmtap/ca-bundle.pem": ("0o644", (0, 0)),
        r / ANCHOR_DIR / "llmtap.crt": ("0o644", (0, 0)),
        r / "etc/profile.d/llmtap.sh": ("0o644", (0, 0)),
        r / "etc/environment.d/90-llmtap.conf": ("0o644", (0, 0)),
        r / "var/log/llmtap.log": ("0o640", (0, 0)),
    }
    for path, (want_mode, want_owner) in expected.items():
        assert (mode(path), owner(path)) == (want_mode, want_owner), path
    ca_pem = (tree.state / "ca/llmtap-ca.pem").read_bytes()
    assert b"PRIVATE KEY" in (tree.state / "ca/mitmproxy-ca.pem").read_bytes()
    assert b"PRIVATE KEY" not in ca_pem
    assert (r / "etc/llmtap/llmtap-ca.pem").read_bytes() == ca_pem
    assert (r / "etc/llmtap/ca-bundle.pem").read_bytes() == BASE_ROOTS + ca_pem
    assert (r / "etc/ssl/certs/ca-certificates.crt").read_bytes() == BASE_ROOTS + ca_pem
    assert (r / "etc/profile.d/llmtap.sh").read_text() == textwrap.dedent("""\
        # Written by `sudo llmtap install`, removed by `sudo llmtap uninstall`: do not edit.
        # Runtimes that do not read the OS trust store learn llmtap's CA from these.
        export NODE_EXTRA_CA_CERTS='/etc/llmtap/llmtap-ca.pem'
        export SSL_CERT_FILE='/etc/llmtap/ca-bundle.pem'
        export REQUESTS_CA_BUNDLE='/etc/llmtap/ca-bundle.pem'
        export CURL_CA_BUNDLE='/etc/llmtap/ca-bundle.pem'
        export CODEX_CA_CERTIFICATE='/etc/llmtap/ca-bundle.pem'
    """)
    assert "SSL_CERT_FILE=/etc/llmtap/ca-bundle.pem\n" in (
        r / "etc/environment.d/90-llmtap.conf").read_text()
    nssdb = str(r / "home/alice/.pki/nssdb")
    assert tree.nss[nssdb] == {ca_pem}
    update = ["update-ca-certificates", "--certsconf", f"{r}/etc/ca-certificates.conf",
              "--certsdir", f"{r}/usr/share/ca-certificates", "--localcertsdir", f"{r}/{ANCHOR_DIR}",
              "--etccertsdir", f"{r}/etc/ssl/certs", "--hooksdir", f"{r}/etc/ca-certificates/update.d"]
    as_alice = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--", "certutil", "-d",
                f"sql:{nssdb}"]
    assert tree.calls == [
        ["useradd", "--prefix", str(r), "--system", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", "--user-group", "llmtap"],
        update,
        [*as_alice, "-L", "-n", "llmtap local CA", "-a"],  # is the step needed: has it the CA?
        [*as_alice, "-L", "-n", "llmtap local CA"],  # an older llmtap CA to remove first?
        [*as_alice, "-A", "-t", "C,,", "-n", "llmtap local CA", "-i", f"{r}/etc/llmtap/llmtap-ca.pem"],
    ]
    # The service: a real keeper running the configured command, its pidfile in run_dir.
    keeper, daemon = tree.keeper().pids() or (0, 0)
    assert process_alive(keeper) and process_alive(daemon)
    assert Path(f"/proc/{daemon}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", b"600"]
    manifest = json.loads((tree.state / "install.json").read_text())
    assert manifest == {"created_user": True, "service": "detached",
                        "trust": "DebianTrustStore", "created_dirs": []}
    assert lines[-1].startswith("next: open a new shell")
    assert any("does not start at boot" in line for line in lines)


def test_second_install_changes_nothing_and_uninstall_purge_leaves_no_trace(tree):
    before = tree.listing()
    config = tree.config()
    tree.installer(config).install()
    installed = tree.listing()
    calls = len(tree.calls)
    lines: list[str] = []
    assert tree.installer(config, lines).install() == []
    assert lines == ["nothing to change: llmtap is already installed and running"]
    assert tree.listing() == installed
    assert tree.calls[calls:] == [tree.calls[2]]  # only the NSS check (`certutil -L -a`)
    lines = []
    tree.installer(config, lines).uninstall(purge=True)
    assert tree.listing() == before
    updates = [c for c in tree.calls if c[0] == "update-ca-certificates"]
    assert updates[-1][:2] == ["update-ca-certificates", "--fresh"]  # drops the CA's links too
    assert tree.keeper().pids() is None
    assert lines[0] == "stopped the detached llmtap service"
    assert lines[-1] == "deleted user llmtap; deleted group llmtap"
    assert (tree.base / "cleanups").read_text() == f"cleanup --config {config}\n"  # ExecStopPost
    lines = []
    tree.installer(config, lines).uninstall(purge=True)
    assert lines == ["nothing to remove: llmtap is not installed"]


def test_uninstall_without_purge_keeps_data_and_reinstall_reuses_the_ca(tree):
    config = tree.config()
    tree.installer(config).install()
    key = (tree.state / "ca/mitmproxy-ca.pem").read_bytes()
    lines: list[str] = []
    tree.installer(config, lines).uninstall()
    assert lines[-1].startswith(f"kept {tree.state} (CA, secrets)")
    assert not (tree.root / "etc/profile.d/llmtap.sh").exists()
    assert not (tree.root / ANCHOR_DIR / "llmtap.crt").exists()
    assert (tree.root / "etc/ssl/certs/ca-certificates.crt").read_bytes() == BASE_ROOTS
    assert not tree.run.exists()
    assert tree_uid(tree)  # the user stays with its data
    tree.installer(config).install()
    assert (tree.state / "ca/mitmproxy-ca.pem").read_bytes() == key


def test_a_failure_at_each_step_rolls_back_everything(tree, monkeypatch):
    config = tree.config()
    before = tree.listing()
    probe = tree.installer(config)
    names = [step.name for step in probe.install_steps(*probe.preflight(True, True),
                                                     Manifest(tree.state / MANIFEST))]
    assert len(names) == 9
    original = LinuxInstaller.install_steps
    for index, name in enumerate(names):
        def failing(self, store, kind, manifest, index=index):  # type: ignore[no-untyped-def]
            steps = original(self, store, kind, manifest)
            apply = steps[index].apply

            def apply_then_fail() -> str:
                apply()  # the change is made, then the step fails: its own undo must run too
                raise RuntimeFailure("injected")

            steps[index].apply = apply_then_fail
            return steps

        monkeypatch.setattr(LinuxInstaller, "install_steps", failing)
        with pytest.raises(RuntimeFailure) as failure:
            tree.installer(config).install()
        assert str(failure.value) == (f"step {name!r} failed: injected; rolled back {index} "
                                      "step(s), the machine is as before")
        assert tree.listing() == before, name
        assert tree.keeper().pids() is None


def test_uninstall_cleans_a_half_installed_machine(tree, monkeypatch):
    """An install killed mid-way (no rollback ran) is still undone by uninstall --purge."""
    config = tree.config()
    before = tree.listing()
    original = LinuxInstaller.install_steps

    def killed(self, store, kind, manifest):  # type: ignore[no-untyped-def]
        steps = original(self, store, kind, manifest)
        steps[7].apply = lambda: (_ for _ in ()).throw(KeyboardInterrupt())  # the service step
        return steps

    monkeypatch.setattr(LinuxInstaller, "install_steps", killed)
    with pytest.raises(KeyboardInterrupt):
        tree.installer(config).install()
    monkeypatch.undo()
    assert (tree.root / "etc/profile.d/llmtap.sh").exists()  # half-installed indeed
    assert json.loads((tree.state / "install.json").read_text())["created_user"] is True
    tree.installer(config).uninstall(purge=True)
    assert tree.listing() == before


def test_a_failing_command_names_the_step_and_rolls_back(tree):
    config = tree.config()
    before = tree.listing()
    tree.fail_on = "update-ca-certificates"
    with pytest.raises(RuntimeFailure) as failure:
        tree.installer(config).install()
    assert str(failure.value) == (
        "step 'OS trust (update-ca-certificates)' failed: update-ca-certificates failed: "
        "update-ca-certificates: simulated failure; rolled back 4 step(s), the machine is as before")
    assert tree.listing() == before


def test_ca_rotate_replaces_and_retrusts_everywhere(tree):
    config = tree.config()
    tree.installer(config).install()
    old_key = (tree.state / "ca/mitmproxy-ca.pem").read_bytes()
    old_ca = (tree.state / "ca/llmtap-ca.pem").read_bytes()
    keeper_before = tree.keeper().pids()
    lines: list[str] = []
    tree.installer(config, lines).rotate()
    new_ca = (tree.state / "ca/llmtap-ca.pem").read_bytes()
    assert new_ca != old_ca and old_key not in (tree.state / "ca/mitmproxy-ca.pem").read_bytes()
    for path in (tree.root / "etc/llmtap/llmtap-ca.pem", tree.root / ANCHOR_DIR / "llmtap.crt"):
        assert path.read_bytes() == new_ca
    system_bundle = (tree.root / "etc/ssl/certs/ca-certificates.crt").read_bytes()
    assert new_ca in system_bundle and old_ca not in system_bundle
    assert tree.nss[str(tree.root / "home/alice/.pki/nssdb")] == {new_ca}
    assert tree.keeper().pids() not in (None, keeper_before)  # restarted on the new CA
    assert not (tree.state / "ca/previous-ca.pem").exists()
    assert lines[-1] == "the old CA is gone: its key is deleted and it is trusted nowhere"


def test_ca_rotate_failure_restores_the_old_ca(tree):
    config = tree.config()
    tree.installer(config).install()
    installed = tree.listing()
    tree.fail_on = "update-ca-certificates"
    with pytest.raises(RuntimeFailure, match=r"step 'OS trust .update-ca-certificates.' failed"):
        tree.installer(config).rotate()
    assert tree.listing() == installed


def test_systemd_service_files_and_commands(tree):
    config = tree.config()
    tree.installer(config, systemd=lambda: True).install(trust=False)
    unit = tree.root / "etc/systemd/system/llmtap.service"
    assert mode(unit) == "0o644"
    text = unit.read_text()
    assert f"ExecStart={tree.fake_llmtap} run --config {config}\n" in text
    assert f"ExecStopPost={tree.fake_llmtap} cleanup --config {config}\n" in text
    assert f"ReadWritePaths=-{tree.state} -{tree.state / 'records'} -{tree.run} -/run/xtables.lock\n" in text
    systemctl = [c for c in tree.calls if c[0] == "systemctl"]
    assert systemctl == [["systemctl", "is-active", "--quiet", "llmtap.service"],
                         ["systemctl", "daemon-reload"], ["systemctl", "enable", "llmtap.service"],
                         ["systemctl", "restart", "llmtap.service"]]
    del tree.calls[:]
    tree.installer(config, systemd=lambda: True).uninstall()
    assert [c for c in tree.calls if c[0] == "systemctl"] == [
        ["systemctl", "disable", "--now", "llmtap.service"], ["systemctl", "daemon-reload"],
        ["systemctl", "reset-failed", "llmtap.service"]]
    assert not unit.exists()


@pytest.mark.parametrize("make_unsafe", [
    lambda tree: os.chown(tree.fake_llmtap, 1000, 1000),  # a `pip install --user` copy
    lambda tree: os.chown(tree.fake_llmtap.parent, 1000, 1000),  # a venv in a home directory
    lambda tree: tree.fake_llmtap.parent.chmod(0o777),
])
def test_a_service_command_a_user_could_replace_is_never_run_as_root(tree, make_unsafe):
    """Attack: a package the agent runs as the user swaps the program systemd starts as root at the
    next boot, and reads every real key. Install refuses before any change."""
    make_unsafe(tree)
    config = tree.config()
    before = tree.listing()
    with pytest.raises(UsageError, match="would run as root what a user can change"):
        tree.installer(config, systemd=lambda: True).install(trust=False)
    assert tree.listing() == before and not tree.calls


def test_default_config_file_is_written_once_and_removed_by_purge(tree):
    config = tree.config()
    settings = dataclasses.replace(load_config(config), source=None)
    installer = LinuxInstaller(settings, None, tree.system(), lambda line: None)
    installer.install(trust=False, service=False)
    written = tree.root / "etc/llmtap/config.toml"
    assert mode(written) == "0o644"
    assert load_config(written).state_dir == Path("/var/lib/llmtap")  # all comments: the defaults
    LinuxInstaller(settings, None, tree.system(), lambda line: None).uninstall(purge=True)
    assert not written.exists() and not (tree.root / "etc/llmtap").exists()


def test_user_config_file_is_never_deleted(tree):
    config = tree.config()
    tree.installer(config).install(service=False)
    tree.installer(config).uninstall(purge=True)
    assert config.exists()


# --- refusals: a clear message and an unchanged machine ------------------------------------------


def run_cli(*args: str) -> tuple[int, str]:
    result = subprocess.run([str(Path(sys.executable).parent / "llmtap"), *args],
                            capture_output=True, text=True)
    return result.returncode, result.stderr.strip()


@pytest.mark.parametrize(("setup", "message"), [
    (lambda t: t.os_release("gentoo", "Gentoo Linux"),
     "llmtap: unsupported distribution 'Gentoo Linux' (ID=gentoo): llmtap knows the Debian/Ubuntu, "
     "Fedora/RHEL and Arch trust stores; set install.trust if yours works like one of them, or use "
     "--no-trust"),
    (lambda t: (t.root / "etc/os-release").unlink(),
     "llmtap: cannot tell the distribution ({root}/etc/os-release is missing): set install.trust = "
     "\"debian\", \"fedora\" or \"arch\", or use --no-trust"),
])
def test_unknown_distribution_is_refused_unchanged(tree, setup, message):
    setup(tree)
    config = tree.config()
    before = tree.listing()
    code, stderr = run_cli("install", "--config", str(config))
    assert (code, stderr) == (2, message.format(root=tree.root))
    assert tree.listing() == before


@pytest.mark.parametrize(("extra", "install", "message"), [
    ("[redirect]\nbackend = \"pf\"\n", {}, "llmtap: redirect.backend = 'pf' does not exist on linux"),
    ("[redirect]\nbogus = 1\n", {}, "llmtap: unknown config key 'redirect.bogus'"),
    ("", {"service": "upstart"},
     "llmtap: install.service must be one of auto, systemd, detached, not 'upstart'"),
    ("", {"public_dir": "etc/llmtap"},
     "llmtap: install.public_dir must be an absolute path, not 'etc/llmtap'"),
    ("", {"service": "systemd"}, "llmtap: install.service = \"systemd\" but systemd is not running "
     "here: use \"auto\" or \"detached\""),
])
def test_config_the_daemon_cannot_use_is_refused_unchanged(tree, extra, install, message):
    config = tree.config(extra, **install)
    before = tree.listing()
    code, stderr = run_cli("install", "--config", str(config))
    assert (code, stderr) == (2, message)
    assert tree.listing() == before


def test_missing_update_ca_certificates_is_refused_unchanged(tree):
    config = tree.config()
    before = tree.listing()
    installer = tree.installer(config, which=lambda name: None if name == "update-ca-certificates"
                               else f"/usr/bin/{name}")
    with pytest.raises(UsageError) as refusal:
        installer.install()
    assert str(refusal.value) == ("update-ca-certificates is missing: install the ca-certificates "
                                  "package (apt-get install ca-certificates) or use --no-trust")
    assert tree.listing() == before and tree.calls == []


def test_without_root_install_uninstall_and_rotate_refuse(tree, monkeypatch, capsys):
    config = tree.config()
    before = tree.listing()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for command in (["install"], ["uninstall", "--purge"], ["ca", "rotate"]):
        assert cli.main([*command, "--config", str(config)]) == 2
        name = " ".join(command[:2] if command[0] == "ca" else command[:1])
        assert capsys.readouterr().err == f"llmtap: llmtap {name} needs root: run it with sudo\n"
    assert tree.listing() == before


def test_port_in_use_is_refused_before_any_change(tree):
    config = tree.config()
    before = tree.listing()

    def taken(port: int) -> None:
        raise UsageError(f"port {port} on 127.0.0.1 is already in use")

    with pytest.raises(UsageError, match=r"port 8443 on 127\.0\.0\.1 is already in use"):
        tree.installer(config, check_port=taken).install()
    assert tree.listing() == before


# --- the keeper ----------------------------------------------------------------------------------


def test_keeper_restarts_on_failure_never_giving_up_but_not_after_exit_2(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # the keeper runs in a thread here
    starts = tmp_path / "starts"
    failing = KeeperSpec(["sh", "-c", f"echo x >> {starts}; exit 1"], ["true"],
                         str(tmp_path / "pid"), restart_sec=0.01)
    keeper = Keeper(failing)
    runner = threading.Thread(target=keeper.run)
    runner.start()
    deadline = time.monotonic() + 20
    while (not starts.exists() or starts.read_text().count("x") < 7) and time.monotonic() < deadline:
        time.sleep(0.05)
    keeper.stopping = True
    runner.join(timeout=10)
    assert starts.read_text().count("x") >= 7  # past StartLimitBurst's old 5: it never gives up
    delays = re.findall(r"restarting in ([\d.]+)s", capfd.readouterr().err)
    assert [float(d) for d in delays[:4]] == [0.01, 0.02, 0.04, 0.08]  # backing off
    starts.unlink()
    bad_config = dataclasses.replace(failing, command=["sh", "-c", f"echo x >> {starts}; exit 2"])
    assert Keeper(bad_config).run() == 2
    assert starts.read_text().count("x") == 1
    assert not (tmp_path / "pid").exists()


def test_installed_keeper_restarts_a_killed_daemon(tree):
    config = tree.config()
    tree.installer(config).install(trust=False)
    keeper, daemon = tree.keeper().pids() or (0, 0)
    os.kill(daemon, 9)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = tree.keeper().pids()
        if pids and pids[1] != daemon and process_alive(pids[1]):
            break
        time.sleep(0.1)
    assert pids and pids[0] == keeper and pids[1] != daemon
    assert "exited with signal SIGKILL" in (tree.root / "var/log/llmtap.log").read_text()


def test_bundle_drops_older_llmtap_cas_from_the_system_roots():
    from llmtap.install.runtime_env import ca_bundle

    old = create_ca(("api.openai.com",))[1]
    new = create_ca(("api.openai.com",))[1]
    bundle = ca_bundle(BASE_ROOTS + old, new)
    assert PEM_BLOCK.findall(bundle) == PEM_BLOCK.findall(BASE_ROOTS + new)


def test_the_daemon_creates_its_user_through_the_runner():
    """`llmtap run` without `llmtap install` makes the user with the installer's useradd."""
    calls: list[list[str]] = []

    def runner(argv: list[str], stdin: str | None = None) -> Completed:
        calls.append(argv)
        return Completed(9, "", "useradd: warning\nuseradd: user 'llmtap-x' already exists\n")

    with pytest.raises(RuntimeFailure, match="cannot create system user 'llmtap-x': useradd: user"):
        create_system_user("llmtap-x", runner, which=lambda name: f"/usr/sbin/{name}")
    assert calls == [useradd_command(Path("/"), "llmtap-x", False)]
    with pytest.raises(RuntimeFailure, match="useradd is missing"):
        create_system_user("llmtap-x", runner, which=lambda name: None)
    assert len(calls) == 1


def test_every_step_is_removed_by_its_tag(tree):
    """wg-quick's discipline: uninstall --purge takes away what every install step put there,
    and without --purge only what it promises to keep stays."""
    installer = tree.installer(tree.config())
    store, kind = installer.preflight(trust=True, service=True)
    manifest = Manifest(installer.layout.manifest)
    steps = installer.install_steps(store, kind, manifest)
    assert [s.tag for s in steps][:2] == ["system user", "directories"] and "service" in steps[-2].tag
    assert unremoved(steps, installer.removals(manifest, purge=True)) == []
    assert unremoved(steps, installer.removals(manifest, purge=False)) == [
        "system user", "certificate authority", "install record"]  # --config: no config file step
