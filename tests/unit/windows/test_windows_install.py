"""`llmtap install` / `uninstall` on a fake Windows machine that answers every tool in its saved
real format (tests/fixtures/windows): a full install then uninstall --purge leaves the machine
byte-identical, and a failure injected after any step rolls every step back."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from llmtap.config import load_config
from llmtap.errors import RuntimeFailure
from llmtap.install import windows as installer_windows
from llmtap.install.manifest import Manifest
from llmtap.install.windows import WindowsInstaller, WindowsSystem
from llmtap.platform.base import ServiceManager
from llmtap.platform.runner import Completed
from llmtap.platform.windows import firewall, sc
from llmtap.platform.windows.elevation import elevated_per_whoami
from llmtap.platform.windows.trust import thumbprint
from windows_fixtures import FIXTURES, FakeNetsh, certutil_listing, fixture

ENV_KEY = r"HKLM\SYSTEM\CurrentControlSet\Control\Session Manager\Environment"
OTHER_ROOT = "a9e2c1b0d4f3a9e2c1b0d4f3a9e2c1b0d4f3a9e2"  # a root someone else trusted


# --- the saved outputs, parsed -------------------------------------------------------------------


def test_sc_query_and_qc() -> None:
    assert sc.parse_state(fixture("sc_query_running.txt")) == "RUNNING"
    assert sc.parse_state(fixture("sc_query_stopped.txt")) == "STOPPED"
    assert sc.parse_state(fixture("sc_query_missing.txt")) is None
    config = sc.parse_fields(fixture("sc_qc.txt"))
    assert config["START_TYPE"] == "2   AUTO_START"
    assert config["SERVICE_START_NAME"] == "LocalSystem"
    assert config["BINARY_PATH_NAME"].endswith('pythonservice.exe"')


def test_sc_query_through_the_runner() -> None:
    answers = {"query": Completed(0, fixture("sc_query_running.txt")),
               "qc": Completed(0, fixture("sc_qc.txt"))}
    calls: list[list[str]] = []

    def runner(argv: list[str], stdin: str | None = None) -> Completed:
        calls.append(argv)
        return answers[argv[1]]

    query = sc.ScQuery("llmtap", runner)
    assert query.state() == "RUNNING" and query.config()["DISPLAY_NAME"] == "llmtap"
    assert calls == [["sc.exe", "query", "llmtap"], ["sc.exe", "qc", "llmtap"]]
    answers["query"] = Completed(1060, fixture("sc_query_missing.txt"))
    assert query.state() is None


def test_netsh_rule_is_read_field_by_field() -> None:
    (rule,) = firewall.parse_rules(fixture("netsh_show_rule.txt"))
    assert rule.fields["Rule Name"] == firewall.RULE_NAME
    assert rule.fields["Edge traversal"] == "No"
    assert rule.blocks_remote(8443) and not rule.blocks_remote(443)
    assert firewall.parse_rules(fixture("netsh_show_rule_missing.txt")) == []
    allowed = fixture("netsh_show_rule.txt").replace("Block", "Allow")
    assert not firewall.parse_rules(allowed)[0].blocks_remote(8443)


def test_whoami_groups_tells_an_elevated_token_from_a_filtered_one() -> None:
    assert elevated_per_whoami(fixture("whoami_groups_elevated.txt")) is True
    assert elevated_per_whoami(fixture("whoami_groups_not_elevated.txt")) is False


def test_the_fixtures_keep_windows_line_endings() -> None:
    raw = (FIXTURES / "sc_query_running.txt").read_bytes()
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")


# --- the fake machine -----------------------------------------------------------------------------


class FakeWindows:
    """certutil, icacls, setx/reg and netsh over one machine state, answering as saved."""

    def __init__(self) -> None:
        self.root_store: dict[str, str] = {OTHER_ROOT: "Some Corp Root"}
        self.certs: dict[str, Path] = {}
        self.env = {"Path": r"C:\Windows\system32;C:\Windows"}
        self.netsh = FakeNetsh()
        self.netsh.rules["Remote Desktop"] = {"name": "Remote Desktop", "localport": "3389"}
        self.acls: dict[str, list[str]] = {}

    def __call__(self, argv: list[str], stdin: str | None = None) -> Completed:
        tool = argv[0]
        if tool == "certutil":
            return self.certutil(argv)
        if tool == "netsh":
            return self.netsh(argv)
        if tool == "icacls":
            self.acls.setdefault(argv[1], []).append(" ".join(argv[2:]))
            return Completed(0, "processed file: " + argv[1] + "\nSuccessfully processed 1 files; "
                             "Failed processing 0 files\n")
        if argv[:2] == ["reg", "query"]:
            name = argv[-1]
            if name not in self.env:
                return Completed(1, "", "ERROR: The system was unable to find the specified "
                                 "registry key or value.")
            return Completed(0, f"\n{ENV_KEY}\n    {name}    REG_SZ    {self.env[name]}\n\n")
        if tool == "setx":
            self.env[argv[1]] = argv[2]
            return Completed(0, "\nSUCCESS: Specified value was saved.\n")
        if argv[:2] == ["reg", "delete"]:
            self.env.pop(argv[4], None)
            return Completed(0, "The operation completed successfully.\n")
        raise AssertionError(f"unexpected command {argv}")

    def certutil(self, argv: list[str]) -> Completed:
        if argv[1] == "-addstore":
            self.root_store[thumbprint(Path(argv[-1]))] = "llmtap local CA"
            self.certs[thumbprint(Path(argv[-1]))] = Path(argv[-1])
            return Completed(0, 'Root "Trusted Root Certification Authorities"\nCertificate '
                             '"llmtap local CA" added to store.\nCertUtil: -addstore command '
                             "completed successfully.\n")
        ours = [t for t, name in self.root_store.items() if name == "llmtap local CA"]
        if argv[1] == "-delstore":
            for sha1 in ours:
                del self.root_store[sha1]
            return Completed(0, "CertUtil: -delstore command completed successfully.\n")
        wanted = ours if argv[-1] == "llmtap local CA" else [t for t in ours if t == argv[-1]]
        if not wanted:
            return Completed(1, fixture("certutil_store_not_found.txt"))
        return Completed(0, certutil_listing(self.certs[wanted[0]]))

    def state(self) -> dict[str, Any]:
        """What install may touch outside the file tree (the ACLs go with the directories)."""
        return {"root": dict(self.root_store), "env": dict(self.env),
                "firewall": {k: dict(v) for k, v in self.netsh.rules.items()}}


class FakeService(ServiceManager):
    name = "winservice"

    def __init__(self) -> None:
        self.installed: list[str] | None = None
        self.running = False

    @classmethod
    def available(cls) -> bool:
        return True

    def install(self, command: list[str]) -> None:
        self.installed = command

    def uninstall(self) -> None:
        self.installed, self.running = None, False

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def is_running(self) -> bool:
        return self.running


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A machine with its own files, roots, variables and rules, and a way to install on it."""
    program_data = tmp_path / "ProgramData"
    (program_data / "Microsoft" / "Crypto").mkdir(parents=True)
    (program_data / "Microsoft" / "Crypto" / "keep.dat").write_bytes(b"\x00other\xff")
    (tmp_path / "Scripts").mkdir()
    (tmp_path / "Scripts" / "llmtap.exe").write_bytes(b"MZ")
    config_file = program_data / "llmtap" / "config.toml"
    config_file.parent.mkdir()
    base = program_data / "llmtap"
    config_file.write_text(textwrap.dedent(f"""\
        state_dir = "{base / 'state'}"
        records_dir = "{base / 'records'}"
        run_dir = "{base / 'run'}"
        [targets]
        hosts = ["api.anthropic.com"]
        [install]
        public_dir = "{base / 'public'}"
        log_file = "{base / 'llmtap.log'}"
        """))
    config = load_config(config_file)
    config_file.unlink()
    config_file.parent.rmdir()  # the default config and its folder are install's to make
    monkeypatch.setattr(installer_windows, "DEFAULT_CONFIG_PATH", config_file)
    monkeypatch.delenv("LLMTAP_CONFIG", raising=False)
    box, service = FakeWindows(), FakeService()

    def installer() -> WindowsInstaller:
        system = WindowsSystem(
            runner=box, elevated=lambda: True, choose_backend=lambda name: None,
            check_port=lambda port: None, cleanup_rules=list, service=lambda _e: service,
            wait_ready=lambda c, s: None, command=lambda: str(tmp_path / "Scripts" / "llmtap.exe"))
        return WindowsInstaller(config, None, system, report=lambda line: None)

    def snapshot() -> dict[str, Any]:
        return {"files": tree(tmp_path), **box.state(),
                "service": (service.installed, service.running)}

    return installer, snapshot, box, service


def test_install_then_uninstall_purge_leaves_the_machine_byte_identical(machine: Any) -> None:
    installer, snapshot, box, service = machine
    before = snapshot()
    done = installer().install()
    assert "firewall rule (netsh)" in done
    assert box.netsh.rules[firewall.RULE_NAME]["localport"] == "8443"
    assert installer().firewall.in_place(8443)
    assert service.running and snapshot() != before
    assert installer().install() == []  # idempotent: a second run changes nothing
    installer().uninstall(purge=True)
    assert snapshot() == before


def step_names(machine: Any) -> list[str]:
    installer = machine[0]()
    return [s.name for s in installer.install_steps(True, True, Manifest(installer.manifest_path))]


STEPS = ["directories", "config file", "certificate authority", "public CA files",
         "OS trust (certutil)", "runtime environment", "firewall rule (netsh)",
         "service (winservice)", "install record"]


def test_the_steps_are_the_ones_parametrized_below(machine: Any) -> None:
    assert step_names(machine) == STEPS


@pytest.mark.parametrize("failing_after", STEPS)
def test_a_failure_after_any_step_rolls_every_step_back(
    machine: Any, failing_after: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    installer, snapshot, _, _ = machine
    before = snapshot()
    real_steps = WindowsInstaller.install_steps

    def steps_failing_after(self: WindowsInstaller, *args: Any) -> list[Any]:
        steps = real_steps(self, *args)
        for step in steps:
            if step.name == failing_after:
                applied = step.apply

                def apply_then_fail(applied: Any = applied) -> str:
                    applied()
                    raise OSError(5, "Access is denied")

                step.apply = apply_then_fail
        return steps

    monkeypatch.setattr(WindowsInstaller, "install_steps", steps_failing_after)
    with pytest.raises(RuntimeFailure, match=rf"step '{re.escape(failing_after)}' failed: Access is denied; "
                                             r"rolled back \d+ step\(s\), the machine is as before"):
        installer().install()
    assert snapshot() == before
