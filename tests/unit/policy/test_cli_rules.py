"""`llmtap rules ...` in-process: add, list, show, enable, disable, rm, move, test."""

from __future__ import annotations

import json
import os

import pytest
from llmtap import cli


@pytest.fixture
def run(config, capsys):  # type: ignore[no-untyped-def]
    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = cli.main(["rules", *argv, "--config", str(config)])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_add_list_show_enable_disable_move_rm(run, config) -> None:  # type: ignore[no-untyped-def]
    assert run("list")[1].startswith("no rules")
    code, out, _ = run("add", "--scope", "header", "--action", "remove", "--match", "regex",
                       "--target", "^x-stainless-", "--description", "SDK telemetry")
    assert code == 0 and out.startswith("added rule 1:")
    assert run("add", "--scope", "body", "--action", "json_path", "--target", "metadata.user_id",
               "--replacement", "anon", "--priority", "10", "--host", "api.anthropic.com")[0] == 0
    db = config.parent / "state" / "rules.db"
    assert db.stat().st_mode & 0o777 == 0o600 and db.stat().st_uid == os.getuid()
    listed = json.loads(run("list", "--json")[1])
    assert [r["id"] for r in listed] == [2, 1]  # priority 10 runs before 100
    assert listed[0]["hosts"] == ["api.anthropic.com"]
    code, out, _ = run("list")
    assert "SDK telemetry" in out and "json_path metadata.user_id" in out
    assert run("disable", "1") == (0, "rule 1 disabled\n", "")
    assert json.loads(run("show", "1", "--json")[1])["enabled"] is False
    assert run("enable", "1")[1] == "rule 1 enabled\n"
    assert run("move", "1", "5")[1] == "rule 1 now has priority 5, runs 1 of 2\n"
    assert "target:       ^x-stainless-" in run("show", "1")[1]
    assert run("rm", "2")[1] == "removed rule 2\n"
    assert [r["id"] for r in json.loads(run("list", "--json")[1])] == [1]


@pytest.mark.parametrize(("args", "message"), [
    (("--scope", "body", "--action", "text_replace", "--match", "regex", "--target", "(?<=a)b"),
     "is not supported by RE2: invalid perl operator"),
    (("--scope", "header", "--action", "remove", "--target", "Host"), "managed by the proxy"),
    (("--scope", "body", "--action", "json_path", "--target", "a..b"), "--target: path"),
])
def test_add_refuses_bad_rules_with_one_line_exit_2(run, args, message) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run("add", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and out == ""


def test_unknown_rule_id_is_a_usage_error(run) -> None:  # type: ignore[no-untyped-def]
    for command in ("show", "enable", "disable", "rm"):
        code, _, err = run(command, "42")
        assert code == 2 and "no rule 42" in err
    assert run("move", "42", "1")[0] == 2


def test_sensitive_header_values_are_masked(run) -> None:  # type: ignore[no-untyped-def]
    run("add", "--scope", "header", "--action", "set", "--target", "Authorization",
        "--replacement", "Bearer sk-real-value")
    assert "sk-real-value" not in run("list")[1]
    assert "sk-real-value" not in run("show", "1")[1]
    assert json.loads(run("list", "--json")[1])[0]["replacement"] == "****"


REQUEST = (b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: sk-ant-hidden\r\n"
           b"x-stainless-os: Linux\r\ncontent-type: application/json\r\n\r\n"
           b'{"metadata":{"user_id":"u-1"},"messages":[{"role":"user","content":"on internal.corp"}]}')


def test_rules_test_shows_a_diff_and_the_hits(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    request = tmp_path / "request.http"
    request.write_bytes(REQUEST)
    run("add", "--scope", "header", "--action", "remove", "--match", "contains", "--target",
        "stainless")
    run("add", "--scope", "body", "--action", "text_replace", "--match", "contains", "--target",
        "internal.corp", "--replacement", "example.com")
    run("add", "--scope", "body", "--action", "json_path", "--target", "metadata.org",
        "--match", "contains", "--pattern", "x", "--replacement", "y")
    run("add", "--scope", "body", "--action", "json_path", "--target", "metadata.user_id",
        "--replacement", "anon", "--host", "api.openai.com")
    code, out, _ = run("test", "--request", str(request))
    assert code == 0
    assert "-x-stainless-os: Linux" in out
    assert '-      "content": "on internal.corp"' in out
    assert '+      "content": "on example.com"' in out
    assert "hit  rule 1: header x-stainless-os removed" in out
    assert "hit  rule 2: body messages[0].content: 1 replacement(s)" in out
    assert "miss rule 3: metadata.org: no such member" in out
    assert '"user_id": "anon"' not in out  # that rule is for another host
    assert "sk-ant-hidden" not in out  # credentials are masked in the diff
    code, out, _ = run("test", "--request", str(request), "--host", "api.openai.com")
    assert '+    "user_id": "anon"' in out


def test_rules_test_takes_a_bare_json_body(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    body = tmp_path / "body.json"
    body.write_text('{"a": "b"}')
    assert run("test", "--request", str(body))[1] == "no rule changes this request\n"
    code, _, err = run("test", "--request", str(tmp_path / "missing.json"))
    assert code == 2 and "--request" in err
