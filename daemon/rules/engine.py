"""Runs the enabled rules on one request, in order, and says what each one changed.

Text rules are gated: one RE2 Set pass over the body's joined strings tells which rules can match
at all, so 50 rules cost one scan, not 50 (after a rule changed strings, the Set runs again on
those strings only). A rule that may match then finds its candidate strings in the same joined
text and works on them alone. RE2::Set has no slow fallback when its DFA runs out of memory (it
then reports no match), so a sentinel pattern that always matches is in the set: when the
sentinel is missing, every rule is tried.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import re2
from llmtap.rules.jsonpath import parse_path, resolve
from llmtap.rules.model import (
    FRAMING_HEADERS,
    Regex,
    Rule,
    RuleError,
    compile_regex,
    expand,
    refuse_empty_matches,
    regex_options,
)
from llmtap.rules.strings import Body, Protected, Strings

if TYPE_CHECKING:
    from mitmproxy.http import Headers

log = logging.getLogger(__name__)

MAX_CHANGES_LISTED = 10  # per rule in a record; the rest are counted
SET_MAX_MEM = 64 << 20


@dataclass
class Outcome:
    """Which rules changed what (`rules_hit`) and which could not apply (`rules_missed`)."""

    hits: dict[int, dict[str, Any]] = field(default_factory=dict)
    misses: list[dict[str, Any]] = field(default_factory=list)

    def hit(self, rule: Rule, change: str) -> None:
        entry = self.hits.setdefault(
            rule.id, {"id": rule.id, "description": rule.description, "changes": []})
        changes: list[str] = entry["changes"]
        if len(changes) < MAX_CHANGES_LISTED:
            changes.append(change)
        else:
            entry["more_changes"] = entry.get("more_changes", 0) + 1

    def miss(self, rule: Rule, reason: str) -> None:
        self.misses.append({"id": rule.id, "description": rule.description, "reason": reason})

    @property
    def rules_hit(self) -> list[dict[str, Any]]:
        return list(self.hits.values())


BodyLoader = Callable[[], "Body | str | None"]


class Compiled:
    """A rule ready to run."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule

    def run(self, headers: Headers, body: BodyState, outcome: Outcome) -> None:
        raise NotImplementedError


class HeaderRule(Compiled):
    def __init__(self, rule: Rule) -> None:
        super().__init__(rule)
        self.name = rule.target.lower()
        self.regex = compile_regex(rule.target, case_sensitive=False) if rule.match == "regex" else None

    def names(self, headers: Headers) -> list[str]:
        present = dict.fromkeys(k.lower() for k in headers)
        if self.rule.match == "exact":
            return [self.name] if self.name in present else []
        if self.regex is not None:
            found = [n for n in present if self.regex.search(n)]
        else:
            found = [n for n in present if self.name in n]
        return [n for n in found if n not in FRAMING_HEADERS]

    def run(self, headers: Headers, body: BodyState, outcome: Outcome) -> None:
        names = self.names(headers)
        if self.rule.action == "remove":
            for name in names:
                del headers[name]
                outcome.hit(self.rule, f"header {name} removed")
            return
        value = self.rule.replacement
        if not names and self.rule.match == "exact":
            headers[self.rule.target] = value
            outcome.hit(self.rule, f"header {self.name} added")
        for name in names:
            if headers.get_all(name) != [value]:
                headers[name] = value
                outcome.hit(self.rule, f"header {name} set")


def _typed(replacement: str, current: Any) -> Any:
    """The replacement as a string where a string was, else as the JSON it spells (if any)."""
    if isinstance(current, str):
        return replacement
    try:
        return json.loads(replacement)
    except ValueError:
        return replacement


class JsonPathRule(Compiled):
    def __init__(self, rule: Rule) -> None:
        super().__init__(rule)
        self.path = parse_path(rule.target)
        self.regex = compile_regex(rule.pattern) if rule.match == "regex" else None

    def run(self, headers: Headers, body: BodyState, outcome: Outcome) -> None:
        loaded = body.load()
        if loaded is None:
            return
        if isinstance(loaded, str) or loaded.kind != "json":
            outcome.miss(self.rule, loaded if isinstance(loaded, str) else "body is not JSON")
            return
        whole = self.rule.match == "exact" and not self.rule.pattern
        slots, reason = resolve(loaded.document, self.path, create_last=whole)
        changed, not_strings = False, 0
        for slot in slots:
            current = slot.container[slot.key] if slot.exists else None  # type: ignore[index]
            new, count = self._new_value(current, slot.exists)
            if count < 0:
                not_strings += 1
                continue
            if count == 0:
                continue
            slot.container[slot.key] = new  # type: ignore[index]
            changed = True
            verb = "created" if not slot.exists else ("set" if whole or self.rule.match == "exact"
                                                       else f"{count} replacement(s)")
            outcome.hit(self.rule, f"body {slot.where} {verb}")
        if changed:
            loaded.structure_changed()
        elif reason:
            outcome.miss(self.rule, reason)
        elif not_strings:
            outcome.miss(self.rule, f"{self.path.text}: value is not a string")

    def _new_value(self, current: Any, exists: bool) -> tuple[Any, int]:
        """(new value, replacements made); -1 when the value is not a string to search."""
        rule = self.rule
        if not rule.pattern:
            new = _typed(rule.replacement, current if exists else None)
            same = exists and type(new) is type(current) and new == current
            return new, 0 if same else 1
        if not isinstance(current, str):
            return current, -1
        if rule.match == "exact":
            return (_typed(rule.replacement, current), 1) if current == rule.pattern else (current, 0)
        if rule.match == "contains":
            count = current.count(rule.pattern)
            return current.replace(rule.pattern, rule.replacement), count
        assert self.regex is not None
        return regex_replace(self.regex, rule.replacement, current)


def regex_replace(regex: Regex, template: str, text: str) -> tuple[str, int]:
    pieces: list[str] = []
    position = count = 0
    for match in regex.finditer(text):
        pieces += [text[position:match.start()], expand(template, match)]
        position = match.end()
        count += 1
    if not count:
        return text, 0
    pieces.append(text[position:])
    return "".join(pieces), count


class TextRule(Compiled):
    """text_replace: every unprotected string; exact means the whole string."""

    def __init__(self, rule: Rule) -> None:
        super().__init__(rule)
        self.regex = None
        self.gate: Regex | None = None
        if rule.match == "regex":
            self.regex = compile_regex(rule.target)
            refuse_empty_matches(self.regex, "target")
            # \A and \z mean the start and end of each string; in the joined text they would not.
            if "\\A" not in rule.target and "\\z" not in rule.target:
                self.gate = compile_regex(f"(?m:{rule.target})")

    @property
    def set_pattern(self) -> str | None:
        """This rule's pattern for the gate Set; None when it cannot be gated."""
        if self.regex is None:
            return str(re2.escape(self.rule.target))
        return f"(?m:{self.rule.target})" if self.gate is not None else None

    def candidates(self, strings: Strings) -> Iterable[int]:
        data = strings.snapshot()
        if self.regex is None:
            needle = self.rule.target.encode("utf-8", "surrogatepass")
            spans, start = [], data.find(needle)
            while start >= 0:
                spans.append((start, start + len(needle)))
                start = data.find(needle, start + len(needle))
            return strings.touching(spans)
        if self.gate is None:
            return range(len(strings))
        return strings.touching(m.span() for m in self.gate.finditer(data))

    def replace(self, value: str) -> tuple[str, int]:
        rule = self.rule
        if rule.match == "exact":
            return (rule.replacement, 1) if value == rule.target else (value, 0)
        if rule.match == "contains":
            count = value.count(rule.target)
            return (value.replace(rule.target, rule.replacement), count) if count else (value, 0)
        return regex_replace(self.regex, rule.replacement, value)

    def run(self, headers: Headers, body: BodyState, outcome: Outcome) -> None:
        strings = body.strings()
        if strings is None or not body.may_match(self):
            return
        for index in list(self.candidates(strings)):
            new, count = self.replace(strings.values[index])
            if count and new != strings.values[index]:
                strings.replace(index, new)
                body.changed_text()
                outcome.hit(self.rule, f"body {strings.where(index)}: {count} replacement(s)")


class TextGate:
    """One RE2 Set over all gateable text rules, with a sentinel that always matches."""

    def __init__(self, rules: Sequence[TextRule]) -> None:
        self.index: dict[int, int] = {}
        self.ungated: set[int] = set()
        options = regex_options()
        options.max_mem = SET_MAX_MEM
        self.set = re2.Set.SearchSet(options)
        self.sentinel = self.set.Add("(?:)")
        for rule in rules:
            pattern = rule.set_pattern
            if pattern is None:
                self.ungated.add(id(rule))
                continue
            try:
                self.index[id(rule)] = self.set.Add(pattern)
            except re2.error:
                self.ungated.add(id(rule))
        self.set.Compile()

    def matches(self, data: bytes) -> set[int] | None:
        """The set's patterns found in `data`; None when the set gave up (try every rule)."""
        found = set(self.set.Match(data) or ())
        return found if self.sentinel in found else None

    def possible(self, rule: TextRule, matched: set[int] | None) -> bool:
        return matched is None or id(rule) in self.ungated or self.index.get(id(rule)) in matched


class BodyState:
    """The body for one run: loaded on first need; the gate is run once on the snapshot of its
    strings, and again only on the strings rules have changed since."""

    def __init__(self, loader: BodyLoader, protected: Protected, gate: TextGate | None) -> None:
        self._loader = loader
        self._loaded = False
        self._body: Body | str | None = None
        self._protected = protected
        self._gate = gate
        self._gated: tuple[Strings, int, set[int] | None] | None = None  # (of, version, found)

    def load(self) -> Body | str | None:
        if not self._loaded:
            self._body = self._loader()
            self._loaded = True
        return self._body

    @property
    def body(self) -> Body | None:
        return self._body if isinstance(self._body, Body) else None

    def strings(self) -> Strings | None:
        body = self.load()
        return body.strings(self._protected) if isinstance(body, Body) else None

    def may_match(self, rule: TextRule) -> bool:
        gate, strings = self._gate, self.strings()
        if gate is None or strings is None:
            return True
        if self._gated is None or self._gated[0] is not strings:
            self._gated = (strings, 0, gate.matches(strings.snapshot()))
        _, version, found = self._gated
        if version != strings.version and found is not None:
            again = gate.matches(strings.dirty_text())
            found = None if again is None else found | again
            self._gated = (strings, strings.version, found)
        return gate.possible(rule, found)

    def changed_text(self) -> None:
        assert isinstance(self._body, Body)
        self._body.changed = True


def compile_rule(rule: Rule) -> Compiled:
    if rule.scope == "header":
        return HeaderRule(rule)
    return JsonPathRule(rule) if rule.action == "json_path" else TextRule(rule)


class RuleSet:
    """The enabled rules, compiled, in order."""

    def __init__(self, rules: Iterable[Rule], protected: Protected | None = None) -> None:
        self.protected = protected or Protected()
        self.rules: list[Compiled] = []
        self.skipped: list[tuple[Rule, str]] = []  # stored rules this build cannot run
        for rule in sorted((r for r in rules if r.enabled), key=Rule.sort_key):
            try:
                self.rules.append(compile_rule(rule))
            except (RuleError, ValueError) as exc:
                self.skipped.append((rule, str(exc)))
                log.warning("rule %d skipped: %s", rule.id, exc)
        text_rules = [r for r in self.rules if isinstance(r, TextRule)]
        self.gate = TextGate(text_rules) if text_rules else None

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def has_body_rules(self) -> bool:
        return any(r.rule.scope == "body" for r in self.rules)

    def run(self, headers: Headers, host: str, path: str, loader: BodyLoader,
            body_rules: bool = True, header_rules: bool = True) -> tuple[Outcome, Body | None]:
        """Applies the rules for this host and path; returns what happened and the body, if it
        was parsed (its `changed` says whether it must be written back)."""
        outcome = Outcome()
        state = BodyState(loader, self.protected, self.gate)
        for compiled in self.rules:
            rule = compiled.rule
            wanted = body_rules if rule.scope == "body" else header_rules
            if wanted and rule.applies_to(host, path):
                compiled.run(headers, state, outcome)
        return outcome, state.body
