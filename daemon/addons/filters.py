"""The "filters" stage: the administrator's request filter rules (llmtap.rules).

Rules are read from state_dir/rules.db and reloaded as soon as `llmtap rules ...` changes them
(one cheap check per request). Header rules run when the headers arrive, body rules when the
body has (a body streamed past mitmproxy's `stream_large_bodies` is never held, so its body
rules are recorded as missed). The record gets `rules_hit` (which rule changed what) and
`rules_missed` (json_path rules that found nothing to change, and why).

Being the first stage to read request bodies, it refuses those that cannot be read within the cap
(llmtap.addons.bodies), whether or not any rule would read them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llmtap.addons import bodies
from llmtap.addons.options import addon_config
from llmtap.flow import fields
from llmtap.rules import Body, Outcome, Protected, RuleSet, RuleSource, db_path
from mitmproxy import ctx, http

log = logging.getLogger(__name__)


def hand_over(flow: http.HTTPFlow, body: Body, dlp_follows: bool) -> None:
    """Hands the parsed body to the dlp stage, which runs next and writes it (re-encoded as it
    came) once for both stages; without a dlp stage, writes a changed body back here."""
    if body.changed and not dlp_follows:
        flow.request.content = body.serialize()
        body.changed = False
    body.raw = flow.request.raw_content
    bodies.hand_over(flow, body)


def record(flow: http.HTTPFlow, outcome: Outcome) -> None:
    if not outcome.hits and not outcome.misses:
        return
    contributed = fields(flow)
    contributed["rules_hit"] = [*contributed.get("rules_hit", []), *outcome.rules_hit]
    if outcome.misses:
        contributed["rules_missed"] = [*contributed.get("rules_missed", []), *outcome.misses]


class Filters:
    def __init__(self, dlp_follows: bool = False) -> None:
        self.dlp_follows = dlp_follows  # the dlp stage runs next and writes the body for both
        self.source: RuleSource | None = None
        self.protected = Protected()
        self.rules = RuleSet([], self.protected)

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("llmtap_state_dir", str, "", "llmtap's state directory.")
        loader.add_option("llmtap_config_file", str, "", "llmtap's TOML config file.")

    def configure(self, updated: set[str]) -> None:
        if "llmtap_config_file" in updated:
            config = addon_config(ctx.options.llmtap_config_file)
            self.protected = Protected(config.rules.all_protected_fields)
            self.rules = RuleSet([], self.protected)
            if self.source is not None:
                self.source.close()  # read the rules again, with the new protected fields
        if "llmtap_state_dir" in updated:
            if self.source is not None:
                self.source.close()
            state_dir = ctx.options.llmtap_state_dir
            self.source = RuleSource(db_path(Path(state_dir))) if state_dir else None
            self.rules = RuleSet([], self.protected)
        self.refresh()

    def refresh(self) -> None:
        """Rebuilds the rule set when the database changed (cheap when it did not)."""
        if self.source is None:
            return
        rules = self.source.poll()
        if rules is not None:
            self.rules = RuleSet(rules, self.protected)
            log.info("rules: %d enabled rule(s) loaded", len(self.rules))

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.refresh()
        if not len(self.rules) or flow.response is not None:
            return
        request = flow.request
        outcome, _ = self.rules.run(request.headers, request.pretty_host, request.path,
                                    loader=lambda: None, body_rules=False)
        record(flow, outcome)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or bodies.refuse_unreadable(flow, "filters"):
            return
        if not self.rules.has_body_rules:
            return
        request = flow.request
        if request.stream:  # it has passed already, never held
            self._streamed(flow)
            return
        outcome, body = self.rules.run(request.headers, request.pretty_host, request.path,
                                       loader=lambda: bodies.load_body(flow), header_rules=False)
        if body is not None:
            hand_over(flow, body, self.dlp_follows)
        record(flow, outcome)

    def _streamed(self, flow: http.HTTPFlow) -> None:
        request, outcome = flow.request, Outcome()
        for compiled in self.rules.rules:
            rule = compiled.rule
            if rule.scope == "body" and rule.applies_to(request.pretty_host, request.path):
                outcome.miss(rule, "request body streamed (too large to hold): not applied")
        record(flow, outcome)
