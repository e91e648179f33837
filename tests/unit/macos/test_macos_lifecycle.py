"""`sudo llmtap install` / `uninstall` on a fake macOS (fake_macos.FakeMac: dscl, security,
launchctl and pfctl state, answering in the formats of the saved outputs, over a temporary root).

install -> uninstall --purge leaves the tree and that state byte-identical; a failure injected
after any step rolls back to exactly the machine before; the user's own pf reference, shell
files and accounts are never touched."""

from __future__ import annotations

import json
import os
import plistlib
import re
import shlex
from pathlib import Path

import pytest
from cryptography import x509
from fake_macos import FakeMac, fixture
from llmtap.config import load_config
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.install import provider_for
from llmtap.install.engine import Step, unremoved
from llmtap.install.macos import MacInstaller
from llmtap.install.macos_system import MacSystem
from llmtap.install.manifest import Manifest
from llmtap.platform.macos import environment
from llmtap.platform.runner import Completed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to the service user)")

ZSHENV = "# the user's own zshenv, no final newline\nexport EDITOR=vim"
PROFILE = ("# System-wide .profile for sh(1)\n\nif [ -x /usr/libexec/path_helper ]; then\n"
           "\teval `/usr/libexec/path_helper -s`\nfi\n")
ROOTS = fixture("security_find_certificate.txt").split("SHA-1 hash: ")[1].split("\n", 1)[1]
STEPS = ["service account _llmtap", "directories", "certificate authority", "public CA files",
         "OS trust (System keychain)", "Java keystores (keytool)", "runtime environment (shells)",
         "runtime environment (GUI apps)", "service (launchd)", "install record"]


class Mac:
    def __init__(self, base: Path) -> None:
        self.base, self.root = base, base / "root"
        for directory in ("etc/ssl", "Library/LaunchDaemons", "Library/LaunchAgents", "var/log",
                          "var/run", "usr/local/bin"):
            (self.root / directory).mkdir(parents=True)
        (self.root / "etc/zshenv").write_text(ZSHENV)
        (self.root / "etc/profile").write_text(PROFILE)
        (self.root / "etc/profile").chmod(0o444)  # as shipped by Apple
        (self.root / "etc/ssl/cert.pem").write_text(ROOTS)
        self.jdk = self.root / "Library/Java/JavaVirtualMachines/temurin-21.jdk/Contents/Home"
        (self.jdk / "lib/security").mkdir(parents=True)
        (self.jdk / "lib/security/cacerts").write_bytes(b"\xfe\xed\xfe\xed stands in for a keystore")
        self.command = self.root / "usr/local/bin/llmtap"
        self.command.write_text("#!/bin/sh\n")
        self.command.chmod(0o755)
        self.fake = FakeMac(self.root)
        self.config_file = base / "config.toml"
        self.config_file.write_text(
            f'state_dir = "{base / "state"}"\nrecords_dir = "{base / "state/records"}"\n'
            f'run_dir = "{base / "run"}"\n[install]\nroot = "{self.root}"\n'
            f'command = "{self.command}"\n')
        self.messages: list[str] = []

    def installer(self, **system: object) -> MacInstaller:
        config = load_config(self.config_file)
        waits = MacSystem(runner=self.fake, is_root=lambda: True, check_port=lambda port: None,
                          wait_ready=lambda config, service: None)
        for name, value in system.items():
            setattr(waits, name, value)
        return MacInstaller(config, str(self.config_file), waits, report=self.messages.append)

    def snapshot(self) -> dict[str, object]:
        return self.fake.snapshot(self.base)


@pytest.fixture
def mac(tmp_path: Path) -> Mac:
    return Mac(tmp_path)


def test_darwin_gets_the_mac_provider(mac: Mac) -> None:
    assert isinstance(provider_for(load_config(mac.config_file), None, platform="darwin"),
                      MacInstaller)


def test_install_then_purge_leaves_the_machine_byte_identical(mac: Mac) -> None:
    before = mac.snapshot()
    assert mac.installer().install() == STEPS
    state = mac.fake.state
    user = state["records"]["/Users/_llmtap"]
    assert user["UniqueID"] == ["499"] and user["PrimaryGroupID"] == ["499"]
    assert user["RecordName"] == ["_llmtap", "llmtap"] and user["IsHidden"] == ["1"]
    assert user["UserShell"] == ["/usr/bin/false"] and user["NFSHomeDirectory"] == ["/var/empty"]
    assert state["records"]["/Groups/_llmtap"]["PrimaryGroupID"] == ["499"]
    assert len(state["keychain"]) == 1 and state["trusted"] == list(state["keychain"])
    trusted = x509.load_pem_x509_certificate(next(iter(state["keychain"].values())).encode())
    permitted = trusted.extensions.get_extension_for_class(x509.NameConstraints).value
    assert "api.anthropic.com" in {n.value for n in permitted.permitted_subtrees or []}
    assert state["jobs"] == {"com.llmtap.daemon": str(mac.root / "Library/LaunchDaemons/"
                                                      "com.llmtap.daemon.plist")}
    assert len(state["tokens"]) == 1 and state["anchor"]
    assert list(state["keystores"]) == [str(mac.jdk / "lib/security/cacerts")]
    assert list(state["keystores"][str(mac.jdk / "lib/security/cacerts")]) == ["llmtap"]
    cert = "/etc/llmtap/llmtap-ca.pem"
    assert state["gui_env"]["501"]["NODE_EXTRA_CA_CERTS"] == cert
    assert state["gui_env"]["501"]["SSL_CERT_FILE"] == "/etc/llmtap/ca-bundle.pem"
    for name in ("etc/zshenv", "etc/profile"):
        assert environment.block_values((mac.root / name).read_text())["NODE_EXTRA_CA_CERTS"] == cert
    assert (mac.root / "etc/profile").stat().st_mode & 0o777 == 0o444
    st = (mac.base / "state").stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o700, 499, 499)
    log = (mac.root / "var/log/llmtap.log").stat()
    assert (log.st_mode & 0o777, log.st_uid) == (0o640, 0)

    mac.installer().uninstall(purge=True)
    assert mac.snapshot() == before


def test_second_install_changes_nothing(mac: Mac) -> None:
    mac.installer().install()
    after_first, calls = mac.snapshot(), len(mac.fake.calls)
    assert mac.installer().install() == []
    assert mac.snapshot() == after_first
    assert "nothing to change: llmtap is already installed and running" in mac.messages
    changing = [c for c in mac.fake.calls[calls:] if c[1:2] in (["-create"], ["add-trusted-cert"],
                                                               ["bootstrap"], ["-E"])]
    assert changing == []


@pytest.mark.parametrize("after", STEPS)
def test_a_failure_after_any_step_rolls_back_everything(mac: Mac, after: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    before = mac.snapshot()
    original = MacInstaller.install_steps

    def with_failure(self: MacInstaller, manifest: Manifest, trust: bool = True,
                     service: bool = True) -> list[Step]:
        steps = original(self, manifest, trust, service)
        at = [s.name for s in steps].index(after) + 1

        def boom() -> str:
            raise OSError(28, "No space left on device")

        return [*steps[:at], Step("boom", lambda: True, boom, lambda: None), *steps[at:]]

    monkeypatch.setattr(MacInstaller, "install_steps", with_failure)
    with pytest.raises(RuntimeFailure, match="step 'boom' failed: No space left on device; "
                       "rolled back"):
        mac.installer().install()
    assert mac.snapshot() == before


@pytest.mark.parametrize(("tool", "verb"), [("dscl", "-create"), ("security", "add-trusted-cert"),
                                            ("launchctl", "bootstrap"), ("launchctl", "asuser")])
def test_a_command_failing_inside_a_step_rolls_back(mac: Mac, tool: str, verb: str) -> None:
    before = mac.snapshot()
    failed: list[bool] = []

    def once(argv: list[str]) -> bool:
        hit = argv[0].endswith(tool) and verb in argv and not failed
        failed.extend([True] if hit else [])
        return hit

    mac.fake.fail = once
    if verb == "asuser":  # setenv in the console session is best effort: the agent redoes it
        mac.installer().install()
        return
    with pytest.raises(RuntimeFailure, match="rolled back"):
        mac.installer().install()
    assert mac.snapshot() == before


def test_uninstall_after_a_daemon_crash_flushes_the_anchor_and_releases_the_token(mac: Mac) -> None:
    mac.installer().install()
    mac.fake.crash = True  # bootout kills it: nothing of pf is cleaned by the daemon
    token = mac.fake.token_file.read_text().strip()
    mac.installer().uninstall()
    calls = mac.fake.calls
    assert ["/sbin/pfctl", "-a", "com.apple/llmtap", "-F", "all"] in calls
    assert ["/sbin/pfctl", "-X", token] in calls
    assert mac.fake.state["tokens"] == [] and mac.fake.state["anchor"] == ""
    assert not mac.fake.token_file.exists()


def test_pf_the_user_enabled_stays_enabled(mac: Mac) -> None:
    mac.fake.state["tokens"] = ["777"]  # someone else's pfctl -E (a firewall app, the user)
    mac.installer().install()
    assert len(mac.fake.state["tokens"]) == 2
    mac.installer().uninstall(purge=True)
    assert mac.fake.state["tokens"] == ["777"]
    assert ["/sbin/pfctl", "-d"] not in mac.fake.calls


def test_uninstall_without_purge_keeps_data_user_and_log(mac: Mac) -> None:
    mac.installer().install()
    mac.installer().uninstall()
    assert (mac.base / "state/ca").is_dir() and (mac.root / "var/log/llmtap.log").exists()
    assert "/Users/_llmtap" in mac.fake.state["records"]
    assert mac.fake.state["keychain"] == {} and mac.fake.state["jobs"] == {}
    assert (mac.root / "etc/zshenv").read_text() == ZSHENV
    assert not (mac.root / "Library/LaunchAgents/com.llmtap.env.plist").exists()
    assert mac.fake.state["gui_env"] == {}
    mac.installer().uninstall(purge=True)
    assert "/Users/_llmtap" not in mac.fake.state["records"]


def test_an_account_install_did_not_create_is_kept(mac: Mac) -> None:
    for kind, attribute in (("Users", "UniqueID"), ("Groups", "PrimaryGroupID")):
        mac.fake.state["records"][f"/{kind}/_llmtap"] = {"RecordName": ["_llmtap", "llmtap"],
                                                          attribute: ["300"]}
    mac.fake.state["records"]["/Users/_llmtap"]["PrimaryGroupID"] = ["300"]
    mac.installer().install()
    assert not any("-create" in c for c in mac.fake.calls)
    mac.installer().uninstall(purge=True)
    assert "/Users/_llmtap" in mac.fake.state["records"]
    assert "kept user _llmtap: `llmtap install` did not create it" in mac.messages


def test_shell_files_install_created_are_deleted_again(mac: Mac) -> None:
    (mac.root / "etc/zshenv").unlink()
    before = mac.snapshot()
    mac.installer().install()
    assert (mac.root / "etc/zshenv").stat().st_mode & 0o777 == 0o644
    assert json.loads((mac.base / "state/install.json").read_text())["created_files"] == [
        str(mac.root / "etc/zshenv")]
    mac.installer().uninstall(purge=True)
    assert mac.snapshot() == before


def test_the_launch_daemon_plist_is_valid(mac: Mac) -> None:
    mac.installer().install()
    path = mac.root / "Library/LaunchDaemons/com.llmtap.daemon.plist"
    definition = plistlib.loads(path.read_bytes())
    assert definition["Label"] == path.stem  # launchd wants the file named after the label
    assert definition["ProgramArguments"] == [str(mac.command), "run", "--config",
                                              str(mac.config_file)]
    assert definition["KeepAlive"] is True and definition["RunAtLoad"] is True
    assert definition["StandardErrorPath"] == "/var/log/llmtap.log"
    st = path.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o644, 0, 0)  # launchd refuses others


@pytest.mark.parametrize(("change", "message"), [
    ({"is_root": lambda: False}, "needs root: run it with sudo"),
])
def test_refusals_change_nothing(mac: Mac, change: dict[str, object], message: str) -> None:
    before = mac.snapshot()
    with pytest.raises(UsageError, match=message):
        mac.installer(**change).install()
    assert mac.snapshot() == before


def test_an_old_macos_is_refused_before_any_change(mac: Mac,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    before = mac.snapshot()
    monkeypatch.setattr(mac.fake, "run_sw_vers",
                        lambda args, stdin: Completed(0, fixture("sw_vers_catalina.txt")))
    with pytest.raises(UsageError, match=re.escape("Mac OS X 10.15.7 is too old")):
        mac.installer().install()
    assert mac.snapshot() == before


def test_a_custom_pf_conf_is_refused_before_any_change(mac: Mac,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    before = mac.snapshot()
    original = mac.fake.run_pfctl

    def custom(args: list[str], stdin: str | None) -> Completed:
        if args == ["-s", "nat"]:  # a pf.conf without the com.apple anchors
            return Completed(0, fixture("pfctl_main_custom_nat.txt"))
        return original(args, stdin)

    monkeypatch.setattr(mac.fake, "run_pfctl", custom)
    with pytest.raises(UsageError, match=re.escape('does not call rdr-anchor "com.apple/*"')):
        mac.installer().install()
    assert mac.snapshot() == before


def test_every_step_has_a_removal(mac: Mac) -> None:
    installer = mac.installer()
    manifest = Manifest(installer.layout.manifest)
    assert unremoved(installer.install_steps(manifest), installer.removals(manifest, True)) == []


def test_rotate_trusts_the_new_ca_everywhere_the_old_one_was(mac: Mac) -> None:
    mac.installer().install()
    state = mac.fake.state
    old = list(state["keychain"])
    mac.installer().rotate()
    assert len(state["keychain"]) == 1 and list(state["keychain"]) != old
    assert state["trusted"] == list(state["keychain"])
    new_pem = (mac.root / "etc/llmtap/llmtap-ca.pem").read_text()
    assert next(iter(state["keystores"].values()))["llmtap"] == new_pem
    assert ["/bin/launchctl", "bootout", "system/com.llmtap.daemon"] in mac.fake.calls
    assert len(state["tokens"]) == 1  # the restarted daemon holds one reference, not two


def test_a_failed_rotation_puts_the_old_ca_back(mac: Mac) -> None:
    mac.installer().install()
    before = mac.snapshot()
    mac.fake.fail = lambda argv: argv[0].endswith("keytool") and "-importcert" in argv and \
        "previous-ca.pem" not in " ".join(argv)
    with pytest.raises(RuntimeFailure, match="rolled back"):
        mac.installer().rotate()
    mac.fake.fail = lambda argv: False
    after = mac.snapshot()
    assert after["state"] == before["state"]
    assert after["files"] == before["files"]


def test_the_commands_of_a_lifecycle_are_exactly_these(mac: Mac) -> None:
    """Every command install and uninstall --purge run, in order (fixtures/macos/
    lifecycle_commands.txt; the temporary root shown as <base>, the CA's SHA-1 as <sha1>)."""
    mac.installer().install()
    count = len(mac.fake.calls)
    mac.installer().uninstall(purge=True)

    def show(argv: list[str]) -> str:
        text = shlex.join(argv).replace(str(mac.base), "<base>")
        return re.sub(r"-Z [0-9A-F]{40}", "-Z <sha1>",
                      re.sub(r"/tmp/llmtap-untrust-\w+", "<tmp>", text))

    lines = ["# install", *map(show, mac.fake.calls[:count]), "# uninstall --purge",
             *map(show, mac.fake.calls[count:])]
    assert lines == fixture("lifecycle_commands.txt").splitlines()


def symlinked_from_a_user_directory(mac: Mac) -> None:
    real = mac.root / "opt/llmtap/bin/llmtap"
    real.parent.mkdir(parents=True)
    mac.command.rename(real)
    mac.command.symlink_to(real)  # the file is root's; the directory holding the link is not
    os.chown(mac.command.parent, 501, 80)


@pytest.mark.parametrize("make_unsafe", [
    lambda mac: os.chown(mac.command, 501, 20),  # a user's own file (a Homebrew or --user install)
    lambda mac: os.chown(mac.command.parent, 501, 20),  # a user's directory: they can swap the file
    lambda mac: mac.command.parent.chmod(0o777),
    lambda mac: (mac.command.parent.chmod(0o775), os.chown(mac.command.parent, 0, 80)),  # admin
    lambda mac: mac.command.write_text(f"#!{mac.command.parent / 'python3'}\n")
    or (mac.command.parent / "python3").write_text("") or os.chown(mac.command.parent / "python3",
                                                                   501, 20),
    lambda mac: symlinked_from_a_user_directory(mac),  # /usr/local/bin after Homebrew on Intel
])
def test_a_command_a_user_could_replace_is_never_run_as_root(mac: Mac, make_unsafe) -> None:
    """Attack: a malicious package running as the user swaps the program the LaunchDaemon runs
    as root at the next boot (and reads every real key). Install refuses before any change."""
    make_unsafe(mac)
    before = mac.snapshot()
    with pytest.raises(UsageError, match="would run as root what a user can change"):
        mac.installer().install()
    assert mac.snapshot() == before
    assert mac.installer().install(service=False)  # without the service there is nothing to swap


@pytest.mark.parametrize(("trust", "service"), [(False, False), (True, False), (False, True)])
def test_partial_installs_come_out_byte_identical_too(mac: Mac, trust: bool, service: bool) -> None:
    before = mac.snapshot()
    mac.installer().install(trust=trust, service=service)
    assert bool(mac.fake.state["keychain"]) == trust and bool(mac.fake.state["jobs"]) == service
    mac.installer().uninstall(purge=True)
    assert mac.snapshot() == before
