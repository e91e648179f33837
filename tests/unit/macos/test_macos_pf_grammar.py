"""The pf rules llmtap loads, and the rules pfctl prints back, parsed by the pf.conf grammar
(tests/support/pf_grammar.py, transcribed from pf.conf(5)) with pfctl's post-parse checks."""

from __future__ import annotations

import paths
import pytest
from llmtap.platform.base import RedirectPlan, TargetAddresses
from llmtap.platform.macos.pf import render_ruleset
from pf_grammar import check_ruleset

FIXTURES = paths.FIXTURES / "macos"
ADDRESSES = TargetAddresses(v4=frozenset({"160.79.104.10", "104.18.33.45"}),
                            v6=frozenset({"2607:6bc0::10"}))


@pytest.mark.parametrize("scope", ["targets", "all"])
@pytest.mark.parametrize("ports", [(443,), (443, 8443)])
@pytest.mark.parametrize("block_quic", [True, False])
@pytest.mark.parametrize("addresses", [ADDRESSES, TargetAddresses(frozenset(), frozenset())])
def test_every_ruleset_llmtap_renders_parses(scope: str, ports: tuple[int, ...], block_quic: bool,
                                             addresses: TargetAddresses) -> None:
    plan = RedirectPlan(proxy_port=8443, service_uid=499, scope=scope, ports=ports,
                        block_quic=block_quic)
    rules = check_ruleset(render_ruleset(plan, addresses))
    assert sum("rdr" in r for r in rules) == 2


@pytest.mark.parametrize("name", ["rules_all.pf", "rules_targets.pf", "rules_no_quic_empty.pf",
                                  "pfctl_anchor_rules.txt", "pfctl_anchor_nat.txt",
                                  "pfctl_main_rules.txt", "pfctl_main_nat.txt",
                                  "pfctl_main_custom_rules.txt"])
def test_saved_rules_parse(name: str) -> None:
    assert check_ruleset((FIXTURES / name).read_text())


@pytest.mark.parametrize(("text", "error"), [
    ("pass out quick on lo0 keep state from any to any", "syntax error"),
    ("rdr pass on lo0 inet proto tcp from any to <t> port 443 -> ::1 port 8443", "family"),
    ("pass out route-to (lo0 ::1) inet proto tcp from any to any", "family"),
    ("pass out quick inet from any to <t> port 443 user != 262", "tcp and udp"),
    ("pass out all\nrdr on lo0 inet proto tcp from any to any -> 127.0.0.1", "in order"),
    ("table llmtap persist", "syntax error"),
])
def test_the_grammar_rejects_what_pfctl_rejects(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        check_ruleset(text)
