"""Request filter rules: the model's checks, JSON paths, the engine (every action x match type and
the edge cases), protected fields, ordering, the SQLite store and its reload."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
import re2
from llmtap.rules import Body, Protected, Rule, RuleError, RuleSet, RuleSource, RuleStore, validate
from llmtap.rules.engine import TextGate, TextRule
from llmtap.rules.jsonpath import PathError, parse_path, resolve
from llmtap.rules.model import compile_regex
from mitmproxy.http import Headers

HOST, PATH = "api.anthropic.com", "/v1/messages"


def rule(scope: str, action: str, match: str = "exact", target: str = "x", replacement: str = "",
         rule_id: int = 1, **extra: Any) -> Rule:
    return validate(Rule(scope, action, match, target, replacement, id=rule_id, **extra))


def headers(**values: str) -> Headers:
    return Headers([(k.replace("_", "-").encode(), v.encode()) for k, v in values.items()])


def run(rules: list[Rule], doc: Any = None, hdrs: Headers | None = None, host: str = HOST,
        path: str = PATH, raw: bytes | None = None):  # type: ignore[no-untyped-def]
    hdrs = hdrs if hdrs is not None else headers()
    content = raw if raw is not None else (json.dumps(doc).encode() if doc is not None else b"")
    outcome, body = RuleSet(rules).run(
        hdrs, host, path, loader=lambda: Body.parse(content, "") if content else None)
    result = json.loads(body.serialize()) if body is not None and body.kind == "json" else (
        body.document if body is not None else None)
    return outcome, result, hdrs


# --- validation ---


@pytest.mark.parametrize(("fields", "message"), [
    (("cookie", "remove", "exact", "x"), "--scope"),
    (("header", "json_path", "exact", "x"), "--action"),
    (("body", "remove", "exact", "x"), "--action"),
    (("header", "remove", "fuzzy", "x"), "--match"),
    (("header", "remove", "exact", ""), "--target must not be empty"),
    (("header", "set", "exact", "bad header"), "not a valid header name"),
    (("header", "set", "exact", "Content-Length"), "managed by the proxy"),
    (("header", "set", "exact", "x-a", "v\r\nInjected: 1"), "line breaks"),
    (("header", "remove", "exact", "x-a", "value"), "makes no sense"),
    (("body", "json_path", "exact", "messages[0"), "--target: path"),
    (("body", "json_path", "contains", "messages[0].content"), "--pattern is required"),
    (("body", "text_replace", "regex", "(?<=a)b"), "not supported by RE2"),
    (("body", "text_replace", "regex", r"(a)\1"), "not supported by RE2"),
    (("body", "text_replace", "regex", "a*"), "empty string"),
    (("body", "text_replace", "regex", "(a)b", r"\2"), "group 2"),
])
def test_bad_rules_are_refused_naming_the_field(fields: tuple[str, ...], message: str) -> None:
    with pytest.raises(RuleError, match=message.replace("(", r"\(")):
        validate(Rule(*fields))


def test_unsupported_regex_reason_is_re2s_own() -> None:
    with pytest.raises(RuleError) as info:
        validate(Rule("body", "text_replace", "regex", "(?=x)y"))
    assert "invalid perl operator" in str(info.value)
    assert "b'" not in str(info.value)  # the reason is text, not a bytes repr


def test_host_and_path_restrictions() -> None:
    r = rule("header", "remove", target="x-a", hosts=("*.OpenAI.com",), paths=("/v1/chat",))
    assert r.applies_to("api.openai.com", "/v1/chat/completions?x=1")
    assert not r.applies_to("api.openai.com", "/v1/chatter")
    assert not r.applies_to("api.anthropic.com", "/v1/chat/completions")
    assert rule("header", "remove", target="x-a", paths=("/v1/*/completions",)).applies_to(
        HOST, "/v1/chat/completions")


# --- JSON paths ---


def test_json_paths_parse_dots_indexes_wildcards_and_quotes() -> None:
    assert parse_path("messages[0].content").segments == (
        ("key", "messages"), ("index", 0), ("key", "content"))
    assert parse_path('$.a["b.c"][-1][*]').segments == (
        ("key", "a"), ("key", "b.c"), ("index", -1), ("all", "*"))
    for bad in ("", "a..b", ".a", "a.", "a[x]", "a[0]b", "a[0"):
        with pytest.raises(PathError):
            parse_path(bad)


def test_resolve_reports_misses_and_creates_only_the_last_member() -> None:
    doc = {"messages": [{"content": "a"}], "metadata": {}}
    slots, miss = resolve(doc, parse_path("messages[3].content"))
    assert slots == [] and "index out of range" in str(miss)
    slots, miss = resolve(doc, parse_path("metadata.user.id"), create_last=True)
    assert slots == [] and "metadata.user: no such member" in str(miss)
    slots, miss = resolve(doc, parse_path("messages.content"))
    assert slots == [] and "messages is not an object" in str(miss)
    [slot], _ = resolve(doc, parse_path("metadata.user_id"), create_last=True)
    assert not slot.exists and slot.where == "metadata.user_id"
    [slot], _ = resolve(doc, parse_path("messages[-1].content"))
    assert slot.where == "messages[0].content"


# --- every action x match type ---

HEADER_CASES = [
    # (action, match, target, replacement, expected headers after)
    ("remove", "exact", "X-Stainless-OS", "", {"x-stainless-lang": "python", "x-keep": "1"}),
    ("remove", "contains", "stainless", "", {"x-keep": "1"}),
    ("remove", "regex", "^x-stainless-(os|lang)$", "", {"x-keep": "1"}),
    ("set", "exact", "x-keep", "2", {"x-stainless-os": "linux", "x-stainless-lang": "python",
                                     "x-keep": "2"}),
    ("set", "contains", "stainless", "redacted", {"x-stainless-os": "redacted",
                                                  "x-stainless-lang": "redacted", "x-keep": "1"}),
    ("set", "regex", "-os$", "none", {"x-stainless-os": "none", "x-stainless-lang": "python",
                                      "x-keep": "1"}),
]


@pytest.mark.parametrize(("action", "match", "target", "replacement", "expected"), HEADER_CASES)
def test_header_actions_by_match_type(action: str, match: str, target: str, replacement: str,
                                      expected: dict[str, str]) -> None:
    hdrs = headers(x_stainless_os="linux", x_stainless_lang="python", x_keep="1")
    outcome, _, hdrs = run([rule("header", action, match, target, replacement)], hdrs=hdrs)
    assert {k.lower(): v for k, v in hdrs.items()} == expected
    assert outcome.rules_hit and outcome.rules_hit[0]["id"] == 1


def test_header_rules_never_touch_framing_headers() -> None:
    hdrs = headers(content_length="2", host="h", x_a="1")
    run([rule("header", "remove", "regex", ".")], hdrs=hdrs)
    assert sorted(k.lower() for k in hdrs) == ["content-length", "host"]


def test_header_set_adds_an_absent_header_and_remove_of_an_absent_one_is_no_hit() -> None:
    outcome, _, hdrs = run([rule("header", "set", "exact", "X-Team", "blue"),
                            rule("header", "remove", "exact", "x-absent", rule_id=2)])
    assert hdrs["x-team"] == "blue"
    assert [h["changes"] for h in outcome.rules_hit] == [["header x-team added"]]
    assert outcome.misses == []


DOC = {"model": "m", "metadata": {"user_id": "user-42", "n": 1},
       "messages": [{"role": "user", "content": "ticket-7 on internal.corp"},
                    {"role": "assistant", "content": "internal.corp"}]}

BODY_CASES = [
    # (action, match, target, pattern, replacement, path into result, expected value)
    ("json_path", "exact", "metadata.user_id", "", "anon", ("metadata", "user_id"), "anon"),
    ("json_path", "contains", "messages[*].content", "internal.corp", "example.com",
     ("messages", 1, "content"), "example.com"),
    ("json_path", "regex", "metadata.user_id", r"user-(\d+)", r"u\1", ("metadata", "user_id"),
     "u42"),
    ("text_replace", "exact", "internal.corp", "", "example.com", ("messages", 1, "content"),
     "example.com"),
    ("text_replace", "contains", "internal.corp", "", "example.com", ("messages", 0, "content"),
     "ticket-7 on example.com"),
    ("text_replace", "regex", r"ticket-(?P<n>\d+)", "", r"T\g<n>", ("messages", 0, "content"),
     "T7 on internal.corp"),
]


@pytest.mark.parametrize(("action", "match", "target", "pattern", "replacement", "where",
                          "expected"), BODY_CASES)
def test_body_actions_by_match_type(action: str, match: str, target: str, pattern: str,
                                    replacement: str, where: tuple[Any, ...], expected: str) -> None:
    outcome, result, _ = run([rule("body", action, match, target, replacement, pattern=pattern)],
                             doc=DOC)
    for key in where:
        result = result[key]
    assert result == expected
    assert outcome.rules_hit[0]["changes"]


def test_text_replace_exact_needs_the_whole_string() -> None:
    _, result, _ = run([rule("body", "text_replace", "exact", "internal.corp", "x")], doc=DOC)
    assert result["messages"][0]["content"] == "ticket-7 on internal.corp"


def test_json_path_replacement_keeps_the_type_of_what_it_replaces() -> None:
    _, result, _ = run([rule("body", "json_path", target="metadata.n", replacement="2.5"),
                        rule("body", "json_path", target="model", replacement="7", rule_id=2),
                        rule("body", "json_path", target="metadata.tags", replacement='["a"]',
                             rule_id=3)], doc=DOC)
    assert result["metadata"]["n"] == 2.5 and result["model"] == "7"
    assert result["metadata"]["tags"] == ["a"]


def test_json_path_misses_are_recorded_not_raised() -> None:
    rules = [rule("body", "json_path", target="metadata.org.id", replacement="x"),
             rule("body", "json_path", target="messages[9].content", replacement="x", rule_id=2),
             rule("body", "json_path", "contains", "metadata.n", "x", pattern="1", rule_id=3)]
    outcome, result, _ = run(rules, doc=DOC)
    assert result == DOC  # nothing created, nothing changed
    reasons = {m["id"]: m["reason"] for m in outcome.misses}
    assert "metadata.org: no such member" in reasons[1]
    assert "index out of range" in reasons[2]
    assert "not a string" in reasons[3]
    assert outcome.rules_hit == []


def test_non_json_body() -> None:
    rules = [rule("body", "json_path", target="a", replacement="b"),
             rule("body", "text_replace", "contains", "secret-host", "host", rule_id=2)]
    outcome, result, _ = run(rules, raw=b"plain text to secret-host")
    assert result == "plain text to host"
    assert outcome.misses[0]["reason"] == "body is not JSON"
    outcome, result, _ = run(rules, raw=b"\xff\xfe\x00binary")
    assert result is None and outcome.rules_hit == []
    assert outcome.misses[0]["reason"] == "body is not JSON or text"


def test_equal_priorities_run_in_creation_order_and_lower_priority_first() -> None:
    rules = [rule("body", "text_replace", "contains", "a", "b", rule_id=2),
             rule("body", "text_replace", "contains", "b", "c", rule_id=1),
             rule("body", "text_replace", "contains", "c", "d", rule_id=3, priority=5)]
    # 3 (priority 5) runs first: c->d; then 1 (older): b->c; then 2: a->b.
    _, result, _ = run(rules, doc={"t": "abc"})
    assert result == {"t": "bcd"}


def test_disabled_rules_do_not_run() -> None:
    outcome, result, _ = run([rule("body", "text_replace", "contains", "a", "b", enabled=False)],
                             doc={"t": "a"})
    assert result is None and outcome.rules_hit == []  # the body was not even parsed


def test_a_rule_sees_what_earlier_rules_wrote() -> None:
    rules = [rule("body", "text_replace", "contains", "alpha", "beta"),
             rule("body", "text_replace", "regex", "^beta$", "gamma", rule_id=2)]
    _, result, _ = run(rules, doc={"a": "alpha"})
    assert result == {"a": "gamma"}


def test_text_replace_skips_protected_fields() -> None:
    doc = {"messages": [
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "about host.corp", "signature": "sig host.corp"},
            {"type": "redacted_thinking", "data": "host.corp"},
            {"type": "tool_use", "id": "toolu_host.corp", "name": "n", "input": {"q": "host.corp"}},
            {"type": "text", "text": "host.corp"}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "host.corp", "content": "host.corp"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "host.corp"}},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                            "data": "host.corp"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,host.corp"}}]}]}
    _, result, _ = run([rule("body", "text_replace", "contains", "host.corp", "X")], doc=doc)
    assistant, user = result["messages"][0]["content"], result["messages"][1]["content"]
    assert assistant[0] == doc["messages"][0]["content"][0]  # thinking and its signature
    assert assistant[1]["data"] == "host.corp" and assistant[2]["id"] == "toolu_host.corp"
    assert assistant[2]["input"]["q"] == "X" and assistant[3]["text"] == "X"
    assert user[0] == {"type": "tool_result", "tool_use_id": "host.corp", "content": "X"}
    assert user[1]["source"]["data"] == "host.corp"  # base64
    assert user[2]["source"]["data"] == "X"  # a text document is text
    assert user[3]["image_url"]["url"] == "data:image/png;base64,host.corp"


def test_protected_fields_are_configurable() -> None:
    rules = [rule("body", "text_replace", "contains", "a", "b")]
    _, body = RuleSet(rules, Protected(["meta.note"])).run(
        headers(), HOST, PATH, loader=lambda: Body.parse(b'{"meta":{"note":"a"},"id":"a"}', ""))
    assert body is not None and json.loads(body.serialize()) == {"meta": {"note": "a"}, "id": "b"}


def test_json_path_may_target_a_protected_field_explicitly() -> None:
    doc = {"messages": [{"content": [{"type": "thinking", "signature": "s"}]}]}
    _, result, _ = run([rule("body", "json_path", target="messages[0].content[0].signature",
                             replacement="t")], doc=doc)
    assert result["messages"][0]["content"][0]["signature"] == "t"


def test_body_rules_only_for_their_hosts() -> None:
    r = rule("body", "text_replace", "contains", "a", "b", hosts=("api.openai.com",))
    _, result, _ = run([r], doc={"t": "a"})
    assert result is None


def test_pathological_pattern_runs_on_re2_in_linear_time() -> None:
    regex = compile_regex("(a+)+$")
    assert type(regex).__module__ == "re2"  # RE2, not Python's backtracking re
    text = "a" * 100_000 + "b"  # catastrophic for a backtracking engine
    assert regex.search(text) is None
    outcome, result, _ = run([rule("body", "text_replace", "regex", "(a+)+$", "x")],
                             doc={"t": text, "u": "aaa"})
    assert result == {"t": text, "u": "x"}
    assert outcome.rules_hit[0]["changes"] == ["body u: 1 replacement(s)"]


def test_gate_tries_every_rule_when_the_set_gives_up() -> None:
    rules = [TextRule(rule("body", "text_replace", "contains", "zz", "y"))]
    gate = TextGate(rules)
    assert not gate.possible(rules[0], gate.matches(b"abc"))
    gate.set = re2.Set.SearchSet()  # a set whose Match finds nothing, as when its DFA fails
    gate.set.Add("never-matches-this")
    gate.set.Compile()
    assert gate.matches(b"abc") is None and gate.possible(rules[0], None)


def test_many_rules_with_anchors_and_unicode() -> None:
    rules = [rule("body", "text_replace", "regex", r"^héllo", "bye", rule_id=1),
             rule("body", "text_replace", "regex", r"\Aend\z", "fin", rule_id=2),
             *(rule("body", "text_replace", "contains", f"never{i}", "x", rule_id=10 + i)
               for i in range(40))]
    _, result, _ = run(rules, doc={"a": "héllo world", "b": "say héllo", "c": "end"})
    assert result == {"a": "bye world", "b": "say héllo", "c": "fin"}


# --- the store and the worker's reload ---


def test_store_round_trip_order_and_reload(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = RuleStore(tmp_path / "rules.db")
    source = RuleSource(tmp_path / "rules.db")
    assert source.poll() == [] and source.poll() is None  # no database: no rules, once
    first = store.add(rule("header", "remove", target="x-a", description="first"))
    second = store.add(rule("body", "text_replace", "contains", "a", "b", priority=5))
    assert (tmp_path / "rules.db").stat().st_mode & 0o777 == 0o600
    assert [r.id for r in source.poll() or []] == [second.id, first.id]
    assert source.poll() is None  # unchanged: nothing to rebuild
    store.set_enabled(first.id, False)
    assert [r.enabled for r in source.poll() or []] == [True, False]
    store.set_priority(first.id, 1)
    assert [r.id for r in source.poll() or []] == [first.id, second.id]
    assert store.remove(second.id) and not store.remove(second.id)
    assert [r.id for r in source.poll() or []] == [first.id]
    assert store.get(first.id) == store.all()[0] and store.get(99) is None
    (tmp_path / "rules.db").unlink()
    assert source.poll() == []


def test_source_keeps_the_rules_it_has_when_the_database_is_broken(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "rules.db"
    RuleStore(path).add(rule("header", "remove", target="x-a"))
    source = RuleSource(path)
    assert len(source.poll() or []) == 1
    source.close()
    path.write_bytes(b"not a database" * 100)
    assert source.poll() is None
    assert "keeping the rules last read" in caplog.text


def test_stored_rule_the_engine_cannot_compile_is_skipped() -> None:
    bad = Rule("body", "text_replace", "regex", "(?=x)", id=7)  # stored by hand, never validated
    ruleset = RuleSet([bad, rule("header", "remove", target="x-a")])
    assert len(ruleset) == 1 and ruleset.skipped[0][0].id == 7


def test_sqlite_schema_is_plain(tmp_path) -> None:  # type: ignore[no-untyped-def]
    RuleStore(tmp_path / "rules.db").add(rule("header", "remove", target="x-a"))
    with sqlite3.connect(tmp_path / "rules.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert connection.execute("PRAGMA user_version").fetchone()[0] == 1
