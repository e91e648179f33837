"""macOS pf backend: golden rules and commands, and the parsing of saved real pfctl outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import paths
import pytest
from llmtap.errors import LlmtapError
from llmtap.platform.base import RedirectPlan, TargetAddresses
from llmtap.platform.macos import pf
from llmtap.platform.macos.pf import PfBackend, PfError
from llmtap.platform.runner import Completed

FIXTURES = paths.FIXTURES / "macos"
ADDRESSES = TargetAddresses(
    v4=frozenset({"160.79.104.10", "162.159.140.245", "104.18.33.45"}),
    v6=frozenset({"2607:6bc0::10", "2606:4700::6812:212d"}),
)
PLAN = RedirectPlan(proxy_port=8443, service_uid=262)
ANCHOR = ["/sbin/pfctl", "-a", "com.apple/llmtap"]


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


class FakeRunner:
    """Records every command; answers from a table keyed by the argv, else success and nothing."""

    def __init__(self, answers: dict[tuple[str, ...], Completed] | None = None) -> None:
        self.answers = dict(answers or {})
        self.hooks: dict[tuple[str, ...], Callable[[], None]] = {}  # side effects of a command
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, argv: list[str], stdin: str | None = None) -> Completed:
        self.calls.append((argv, stdin))
        if hook := self.hooks.get(tuple(argv)):
            hook()
        return self.answers.get(tuple(argv), Completed(0))

    @property
    def argvs(self) -> list[list[str]]:
        return [argv for argv, _ in self.calls]


# --- golden rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "addresses", "golden"),
    [
        (PLAN, ADDRESSES, "rules_targets.pf"),
        (RedirectPlan(8443, 262, ports=(443, 8443), scope="all"), ADDRESSES, "rules_all.pf"),
        (RedirectPlan(9443, 501, block_quic=False), TargetAddresses(), "rules_no_quic_empty.pf"),
    ],
)
def test_ruleset_is_golden(plan: RedirectPlan, addresses: TargetAddresses, golden: str) -> None:
    assert pf.render_ruleset(plan, addresses) == fixture(golden)


def test_ruleset_guards_the_loop_and_both_families() -> None:
    rules = pf.render_ruleset(PLAN, ADDRESSES).splitlines()
    route_to = [r for r in rules if "route-to" in r]
    assert len(route_to) == 2
    assert all("user != 262" in r for r in route_to)
    assert any(" inet " in r and "127.0.0.1" in r for r in route_to)
    assert any(" inet6 " in r and "(lo0 ::1)" in r for r in route_to)
    assert [r for r in rules if r.startswith("rdr ")] == [
        "rdr pass on lo0 inet proto tcp from any to <llmtap_targets4> port 443 "
        "-> 127.0.0.1 port 8443",
        "rdr pass on lo0 inet6 proto tcp from any to <llmtap_targets6> port 443 -> ::1 port 8443",
    ]
    quic = [r for r in rules if "proto udp" in r]
    assert len(quic) == 2 and all(r.startswith("block return out quick") for r in quic)


def test_rules_never_name_the_main_ruleset() -> None:
    for argv in (pf.load_command(), pf.flush_command()):
        assert argv[1:3] == ["-a", "com.apple/llmtap"]
    assert pf.ANCHOR.startswith("com.apple/")  # evaluated by the stock `anchor "com.apple/*"`


def test_commands_are_golden() -> None:
    assert pf.load_command() == [*ANCHOR, "-f", "-"]
    assert pf.flush_command() == [*ANCHOR, "-F", "all"]
    assert pf.enable_command() == ["/sbin/pfctl", "-E"]
    assert pf.release_command("123") == ["/sbin/pfctl", "-X", "123"]
    assert pf.show_command("nat") == [*ANCHOR, "-s", "nat"]
    assert pf.show_command("info", None) == ["/sbin/pfctl", "-s", "info"]


# --- parsing saved outputs -----------------------------------------------------------------------


def test_token_from_pfctl_enable() -> None:
    assert pf.parse_token(fixture("pfctl_enable_stderr.txt")) == "14574231651387265831"
    assert pf.parse_token("pf enabled\n") is None


def test_rules_and_hooks() -> None:
    assert len(pf.parse_rules(fixture("pfctl_anchor_rules.txt"))) == 4
    assert len(pf.parse_rules(fixture("pfctl_anchor_nat.txt"))) == 2
    assert pf.parse_rules("No ALTQ support in kernel\nALTQ related functions disabled\n") == []
    assert pf.missing_hooks(fixture("pfctl_main_rules.txt"), fixture("pfctl_main_nat.txt")) == []
    assert pf.missing_hooks(
        fixture("pfctl_main_custom_rules.txt"), fixture("pfctl_main_custom_nat.txt")
    ) == ['rdr-anchor "com.apple/*"', 'anchor "com.apple/*"']


def test_status() -> None:
    assert pf.pf_enabled(fixture("pfctl_info_enabled.txt"))
    assert not pf.pf_enabled(fixture("pfctl_info_disabled.txt"))


def test_states_of_a_real_state_table() -> None:
    states = pf.parse_states(fixture("pfctl_state.txt"))
    assert len(states) == 12
    rdr = states[2]
    assert (rdr.interface, rdr.proto, rdr.direction) == ("ALL", "tcp", "<-")
    assert rdr.hosts == (("127.0.0.1", 8443), ("160.79.104.10", 443), ("192.168.1.23", 52431))
    assert rdr.source == ("192.168.1.23", 52431)
    assert rdr.destination == ("160.79.104.10", 443)
    assert rdr.state == "ESTABLISHED:ESTABLISHED"
    nat = states[10]  # lan -> gwy -> ext: a NAT out through a VPN
    assert nat.source == ("192.168.1.23", 52450)
    assert nat.destination == ("93.184.216.34", 443)
    v6 = states[8]
    assert v6.hosts[0] == ("::1", 8443)
    assert v6.source == ("2a01:e0a:1d5:7c40:8d3:21f4:9a1b:3c2e", 52432)


@pytest.mark.parametrize(
    ("client", "original"),
    [
        (("192.168.1.23", 52431), ("160.79.104.10", 443)),
        (("192.168.1.23", 52433), ("104.18.33.45", 443)),
        (("2a01:e0a:1d5:7c40:8d3:21f4:9a1b:3c2e", 52432), ("2607:6bc0::10", 443)),
        (("2A01:E0A:1D5:7C40:08D3:21F4:9A1B:3C2E", 52432), ("2607:6bc0::10", 443)),
        (("192.168.1.23", 52460), ("140.82.121.4", 443)),  # only the route-to state so far
        (("192.168.1.23", 61234), None),  # udp
        (("192.168.1.23", 40000), None),
    ],
)
def test_original_destination(client: tuple[str, int], original: tuple[str, int] | None) -> None:
    assert pf.original_destination(pf.parse_states(fixture("pfctl_state.txt")), client) == original


def test_freebsd_style_states() -> None:
    states = pf.parse_states(fixture("pfctl_state_freebsd.txt"))
    assert pf.original_destination(states, ("192.168.1.23", 52431)) == ("160.79.104.10", 443)


def test_garbage_lines_are_skipped() -> None:
    text = "No ALTQ support in kernel\n\nALL tcp nonsense -> 1.2.3.4:80 X\nALL tcp a b c d\n"
    assert pf.parse_states(text) == []


# --- the backend, with every pfctl call recorded ------------------------------------------------


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeRunner:
    fake = FakeRunner({
        ("/sbin/pfctl", "-s", "rules"): Completed(0, fixture("pfctl_main_rules.txt")),
        ("/sbin/pfctl", "-s", "nat"): Completed(0, fixture("pfctl_main_nat.txt")),
        ("/sbin/pfctl", "-E"): Completed(0, "", fixture("pfctl_enable_stderr.txt")),
    })
    monkeypatch.setattr(PfBackend, "runner", fake)
    monkeypatch.setattr(PfBackend, "token_file", tmp_path / "llmtap-pf.token")
    return fake


def loaded(fake: FakeRunner) -> None:
    """From now on the anchor answers like a loaded one, until it is flushed."""
    fake.answers[(*ANCHOR, "-s", "nat")] = Completed(0, fixture("pfctl_anchor_nat.txt"))
    fake.answers[(*ANCHOR, "-s", "rules")] = Completed(0, fixture("pfctl_anchor_rules.txt"))
    fake.hooks[(*ANCHOR, "-F", "all")] = lambda: flushed(fake)


def flushed(fake: FakeRunner) -> None:
    fake.answers.pop((*ANCHOR, "-s", "nat"), None)
    fake.answers.pop((*ANCHOR, "-s", "rules"), None)


def test_install_runs_exactly_these_commands(runner: FakeRunner) -> None:
    backend = PfBackend(PLAN)
    backend.install(ADDRESSES)
    assert runner.argvs == [
        [*ANCHOR, "-s", "nat"],  # startup cleanup: nothing left over
        [*ANCHOR, "-s", "rules"],
        ["/sbin/pfctl", "-s", "rules"],  # the main ruleset calls com.apple/*
        ["/sbin/pfctl", "-s", "nat"],
        [*ANCHOR, "-f", "-"],
        ["/sbin/pfctl", "-E"],
    ]
    assert runner.calls[4][1] == fixture("rules_targets.pf")
    assert PfBackend.token_file.read_text() == "14574231651387265831\n"


def test_update_reloads_the_anchor_only(runner: FakeRunner) -> None:
    backend = PfBackend(PLAN)
    backend.install(ADDRESSES)
    runner.calls.clear()
    fewer = TargetAddresses(v4=frozenset({"160.79.104.10"}))
    backend.update_targets(fewer)
    assert runner.calls == [([*ANCHOR, "-f", "-"], pf.render_ruleset(PLAN, fewer))]


def test_remove_flushes_and_releases_only_our_reference(runner: FakeRunner) -> None:
    backend = PfBackend(PLAN)
    backend.install(ADDRESSES)
    runner.calls.clear()
    backend.remove()
    backend.remove()  # safe twice
    assert runner.argvs == [
        [*ANCHOR, "-F", "all"],
        ["/sbin/pfctl", "-X", "14574231651387265831"],
    ]
    assert ["/sbin/pfctl", "-d"] not in runner.argvs  # never disables a pf others need
    assert not PfBackend.token_file.exists()


def test_alive_checks_pf_at_most_every_few_seconds(runner: FakeRunner) -> None:
    now = [100.0]
    backend = PfBackend(PLAN)
    backend.clock = lambda: now[0]
    backend.install(ADDRESSES)
    loaded(runner)
    runner.answers[("/sbin/pfctl", "-s", "info")] = Completed(0, fixture("pfctl_info_enabled.txt"))
    runner.calls.clear()
    assert backend.alive()
    assert runner.calls == []
    now[0] += pf.ALIVE_INTERVAL_S
    assert backend.alive()
    assert runner.argvs == [["/sbin/pfctl", "-s", "info"], [*ANCHOR, "-s", "nat"]]
    runner.answers[("/sbin/pfctl", "-s", "info")] = Completed(0, fixture("pfctl_info_disabled.txt"))
    now[0] += pf.ALIVE_INTERVAL_S
    assert not backend.alive()  # someone ran `pfctl -d`


def test_a_custom_main_ruleset_is_refused_before_loading(runner: FakeRunner) -> None:
    runner.answers[("/sbin/pfctl", "-s", "rules")] = Completed(
        0, fixture("pfctl_main_custom_rules.txt"))
    runner.answers[("/sbin/pfctl", "-s", "nat")] = Completed(0, fixture("pfctl_main_custom_nat.txt"))
    with pytest.raises(PfError) as caught:
        PfBackend(PLAN).install(ADDRESSES)
    assert 'rdr-anchor "com.apple/*"' in str(caught.value)
    assert "\n" not in str(caught.value)
    assert [*ANCHOR, "-f", "-"] not in runner.argvs


def test_a_refused_ruleset_is_one_line(runner: FakeRunner) -> None:
    runner.answers[(*ANCHOR, "-f", "-")] = Completed(
        1, "", "No ALTQ support in kernel\nALTQ related functions disabled\n"
        "stdin:4: syntax error\npfctl: Syntax error in config file: pf rules not loaded\n")
    with pytest.raises(PfError) as caught:
        PfBackend(PLAN).install(ADDRESSES)
    assert str(caught.value) == "loading the pf rules failed: stdin:4: syntax error"
    assert isinstance(caught.value, LlmtapError) and caught.value.exit_code == 1


def test_failing_to_enable_leaves_nothing(runner: FakeRunner) -> None:
    runner.hooks[(*ANCHOR, "-f", "-")] = lambda: loaded(runner)
    runner.answers[("/sbin/pfctl", "-E")] = Completed(
        1, "", "pfctl: DIOCSTARTREF: Cannot allocate memory")
    with pytest.raises(PfError, match="enabling pf failed: pfctl: DIOCSTARTREF"):
        PfBackend(PLAN).install(ADDRESSES)
    assert runner.argvs[-5:] == [
        ["/sbin/pfctl", "-E"],
        [*ANCHOR, "-s", "nat"],
        [*ANCHOR, "-F", "all"],
        [*ANCHOR, "-s", "nat"],
        [*ANCHOR, "-s", "rules"],
    ]
    assert not PfBackend.rules_present()
    assert not PfBackend.token_file.exists()


def test_cleanup_removes_a_leftover_anchor_and_token(runner: FakeRunner) -> None:
    loaded(runner)
    PfBackend.token_file.write_text("777\n")
    assert PfBackend.rules_present()
    runner.calls.clear()
    assert PfBackend.cleanup_leftovers() is True
    assert runner.argvs == [
        [*ANCHOR, "-s", "nat"],
        [*ANCHOR, "-F", "all"],
        [*ANCHOR, "-s", "nat"],
        [*ANCHOR, "-s", "rules"],
        ["/sbin/pfctl", "-X", "777"],
    ]
    assert not PfBackend.token_file.exists()
    runner.calls.clear()
    assert PfBackend.cleanup_leftovers() is False
    assert runner.argvs == [[*ANCHOR, "-s", "nat"], [*ANCHOR, "-s", "rules"]]


def test_an_anchor_that_will_not_flush_is_an_error(runner: FakeRunner) -> None:
    loaded(runner)
    runner.hooks.clear()  # the flush does not take
    runner.answers[(*ANCHOR, "-F", "all")] = Completed(1, "", "pfctl: Operation not permitted")
    with pytest.raises(PfError, match=r"could not flush the pf anchor com\.apple/llmtap"):
        PfBackend.cleanup_leftovers()


def test_redirected_connections_for_status(runner: FakeRunner) -> None:
    runner.answers[("/sbin/pfctl", "-s", "state")] = Completed(0, fixture("pfctl_state.txt"))
    connections = PfBackend.redirected_connections()
    assert [(c.source, c.destination) for c in connections] == [
        (("192.168.1.23", 52431), ("160.79.104.10", 443)),
        (("192.168.1.23", 52433), ("104.18.33.45", 443)),
        (("2a01:e0a:1d5:7c40:8d3:21f4:9a1b:3c2e", 52432), ("2607:6bc0::10", 443)),
    ]


def test_chosen_on_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtap import redirect

    monkeypatch.setattr("sys.platform", "darwin")
    assert redirect.backends_for_this_os() == [PfBackend]
    monkeypatch.setattr(PfBackend, "available", classmethod(lambda cls: False))
    with pytest.raises(LlmtapError, match="/sbin/pfctl"):
        redirect.choose_backend("pf")


def test_not_available_off_macos() -> None:
    assert PfBackend.available() is False
    assert PfBackend.dies_with_owner is False  # the guardian and the next start clean up
