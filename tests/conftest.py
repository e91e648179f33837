"""Fixtures: the network-namespace test bed (root only) and llmtap daemons inside it."""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from testbed import Daemon, Testbed, new_testbed, start_daemon

ROOT_TOOLS = ("ip", "nft", "iptables", "curl")
DAEMONS = pytest.StashKey[list[Daemon]]()
LOG_LINES = 80  # of each daemon's log, added to a failed test's report


def root_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nft)"
    missing = [tool for tool in ROOT_TOOLS if not shutil.which(tool)]
    if missing:
        return f"needs {', '.join(missing)} (the README's test command installs them)"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = root_skip_reason()
    if reason is None:
        return
    for item in items:
        if "root" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report ends with its daemons' logs: CI's output is all there is."""
    report = yield
    if report.when == "call" and report.failed:
        for n, daemon in enumerate(item.stash.get(DAEMONS, [])):
            lines = daemon.stderr().splitlines()[-LOG_LINES:]
            report.sections.append((f"llmtap daemon {n} log (last {len(lines)} lines)",
                                    "\n".join(lines)))
    return report


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config whose service user is whoever runs the tests (chown works without root).
    Modules that need another config define their own `config` fixture."""
    user = pwd.getpwuid(os.getuid()).pw_name
    path = tmp_path / "config.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\nrecords_dir = "{tmp_path / "records"}"\n'
                    f'service_user = "{user}"\n')
    return path


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    if reason := root_skip_reason():
        pytest.skip(reason)
    bed = new_testbed()
    try:
        bed.create()
        bed.start_upstream()
        yield bed
    finally:
        bed.destroy()
        shutil.rmtree(bed.workdir, ignore_errors=True)


@pytest.fixture
def llmtap(testbed: Testbed, request: pytest.FixtureRequest) -> Iterator[Callable[..., Daemon]]:
    """Starts `llmtap run` in the client namespace (ready); always stopped and cleaned after."""
    daemons: list[Daemon] = []
    request.node.stash[DAEMONS] = daemons

    def start(wait: bool = True, extra_toml: str = "", **redirect: Any) -> Daemon:
        daemon = start_daemon(testbed, extra_toml, **redirect)
        daemons.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    testbed.upstream_log.write_text("")
    try:
        yield start
    finally:
        for daemon in daemons:
            if daemon.proc.poll() is None:
                daemon.stop()
            shutil.rmtree(daemon.root, ignore_errors=True)
        # A test that left rules behind must not break the next one (the test itself asserts).
        testbed.ns_exec(testbed.client_ns, "nft", "delete", "table", "inet", "llmtap", check=False)
