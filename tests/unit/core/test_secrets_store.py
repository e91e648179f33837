"""The secret store and `llmtap secrets` / `llmtap env`, in process, against a temporary state dir."""

from __future__ import annotations

import io
import json
import os
import pwd
import re
from pathlib import Path

import keyring
import keyring.backend
import pytest
from llmtap import cli, provider_keys
from llmtap import secret_references as references
from llmtap import secrets_store as store

KEY = "sk-ant-api03-THEREALKEYvalue0123456789wxyz"


@pytest.fixture
def run(config, monkeypatch, capsys):
    def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        try:
            code = cli.main([*argv, "--config", str(config)])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def paths_of(config: Path) -> store.StorePaths:
    return store.StorePaths.under(config.parent / "state")


def test_set_stores_a_sealed_value_in_private_files(run, config):
    code, out, err = run("secrets", "set", "anthropic", "--host", "api.anthropic.com", stdin=KEY + "\n")
    assert code == 0, err
    placeholder = re.search(r"placeholder: (\S+)", out)
    assert placeholder and re.fullmatch(r"sk-ant-api03-[A-Za-z0-9_-]{93}AA", placeholder.group(1))
    paths = paths_of(config)
    assert (paths.directory.stat().st_mode & 0o777) == 0o750  # the worker reads through its group
    for path in (paths.store, paths.key):
        assert (path.stat().st_mode & 0o777) == 0o640 and path.stat().st_uid == os.getuid()
    for path in paths.directory.parent.rglob("*"):  # the plain key is in no file
        assert not path.is_file() or KEY.encode() not in path.read_bytes()
    [secret] = store.read_store(paths)
    assert secret.header == "x-api-key" and secret.hosts == ("api.anthropic.com",)
    assert store.unseal(store.read_key(paths) or b"", secret.id, secret.sealed or "") == KEY


def test_list_shows_the_last_four_characters_only(run):
    run("secrets", "set", "anthropic", "--host", "api.anthropic.com", stdin=KEY)
    run("secrets", "set", "ref", "--host", "api.openai.com", "--header", "api-key", "--when-absent",
        "--for-user", "alice", "--for-user", "bob", stdin="env:OPENAI_REAL")
    code, out, _ = run("secrets", "list")
    assert code == 0 and KEY not in out and KEY[:-4] not in out
    assert "…wxyz" in out and "env:OPENAI_REAL" in out and "last used: never" in out
    assert "api-key (added when the client sends none, for users: alice, bob)" in out
    code, out, _ = run("secrets", "list", "--json")
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["anthropic", "ref"]
    assert rows[0]["key"] == "…wxyz" and rows[1]["when_absent"] is True
    assert rows[1]["for_users"] == ["alice", "bob"]
    assert set(rows[0]) >= {"hosts", "header", "placeholder", "created_at", "last_used"}


def test_when_absent_must_name_the_users_it_serves(run):
    code, _, err = run("secrets", "set", "a", "--host", "api.openai.com", "--when-absent", stdin=KEY)
    assert (code, err.strip()) == (2, "llmtap: --when-absent needs --for-user USER (repeatable): the "
                                      "local users whose requests get the key added")
    code, _, err = run("secrets", "set", "a", "--host", "api.openai.com", "--for-user", "x", stdin=KEY)
    assert (code, err.strip()) == (2, "llmtap: --for-user goes with --when-absent")


@pytest.mark.parametrize(("argv", "stdin", "message"), [
    (("--host", "api.anthropic.com", "--header", "x-token"), KEY,
     "llmtap: --header must be one of x-api-key, authorization, api-key, x-goog-api-key, query:key, "
     "not 'x-token'"),
    (("--host", "api.anthropic.com"), "  \n", "llmtap: empty value: pipe the key on stdin or type it at the "
     "prompt"),
    (("--host", "api.anthropic.com"), "two words", "llmtap: the value must be one token of printable ASCII "
     "(no spaces or newlines)"),
    ((), KEY, "llmtap: --host is required: name the host(s) this key may be sent to"),
    (("--host", "not a host"), KEY, "llmtap: --host 'not a host' is not a host name"),
    (("--host", "api.openai.com"), "env:1BAD", "llmtap: bad reference 'env:1BAD': use env:VAR, "
     "file:/absolute/path or keyring:SERVICE/USER"),
])
def test_bad_input_is_one_line_with_exit_2(run, argv, stdin, message):
    code, out, err = run("secrets", "set", "s", *argv, stdin=stdin)
    assert (code, err.strip(), out) == (2, message, "")


def test_duplicate_name_is_refused_and_replace_keeps_the_placeholder(run, config):
    run("secrets", "set", "a", "--host", "api.anthropic.com", stdin=KEY)
    code, _, err = run("secrets", "set", "a", "--host", "api.anthropic.com", stdin="sk-ant-other")
    assert (code, err.strip()) == (2, "llmtap: secret 'a' already exists: add --replace to rotate its "
                                      "value (the placeholder stays the same)")
    before = store.read_store(paths_of(config))[0]
    code, out, _ = run("secrets", "set", "a", "--replace", stdin="sk-ant-rotated")
    after = store.read_store(paths_of(config))[0]
    assert code == 0 and "rotated secret 'a'" in out
    assert (after.placeholder, after.id, after.hosts, after.header) == (
        before.placeholder, before.id, before.hosts, before.header)
    assert store.unseal(store.read_key(paths_of(config)) or b"", after.id, after.sealed or "") == \
        "sk-ant-rotated"
    code, _, err = run("secrets", "set", "b", "--host", "api.openai.com", stdin=before.placeholder)
    assert (code, err.strip()) == (2, "llmtap: that is the placeholder of secret 'a', not a real key")


@pytest.mark.parametrize("target", ["store", "key", "directory"])
def test_a_store_with_wrong_permissions_is_refused_with_the_fix(run, config, target):
    run("secrets", "set", "a", "--host", "api.anthropic.com", stdin=KEY)
    path = getattr(paths_of(config), target)
    path.chmod(0o755 if target == "directory" else 0o644)
    code, out, err = run("secrets", "list")
    user = pwd.getpwuid(os.getuid()).pw_name
    mode = "0750" if target == "directory" else "0640"
    octal = mode.lstrip("0")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.strip() == (
        f"llmtap: refusing the secret store: {path} is mode "
        f"{'0755' if target == 'directory' else '0644'} (must be root's, group {user}, {mode}); "
        f"fix: sudo chown root:{user} {path} && sudo chmod {octal} {path}")
    assert run("secrets", "set", "b", "--host", "api.openai.com", stdin=KEY)[0] == 2
    assert run("env")[0] == 2


def test_rm_and_unknown_names(run, config):
    run("secrets", "set", "a", "--host", "api.anthropic.com", stdin=KEY)
    assert run("secrets", "rm", "a")[:2] == (0, "removed secret 'a'\n")
    assert store.read_store(paths_of(config)) == []
    code, _, err = run("secrets", "rm", "a")
    assert (code, err.strip()) == (2, "llmtap: no secret named 'a' (see `llmtap secrets list`)")


def test_env_prints_exports_for_each_shell(run, config):
    run("secrets", "set", "anthropic", "--host", "api.anthropic.com", stdin=KEY)
    run("secrets", "set", "openai", "--host", "api.openai.com", stdin="sk-proj-real")
    run("secrets", "set", "gemini", "--host", "generativelanguage.googleapis.com", stdin="AIzaReal")
    run("secrets", "set", "gw", "--host", "llm.example.com", stdin="gw-real")
    ph = {s.name: s.placeholder for s in store.read_store(paths_of(config))}
    assert re.fullmatch(r"sk-proj-[\w-]{74}T3BlbkFJ[\w-]{74}", ph["openai"])
    assert re.fullmatch(r"AIza[\w-]{35}", ph["gemini"])
    code, out, _ = run("env")
    assert code == 0
    assert out.splitlines() == [
        f"export ANTHROPIC_API_KEY='{ph['anthropic']}'",
        f"export OPENAI_API_KEY='{ph['openai']}'",
        f"export CODEX_API_KEY='{ph['openai']}'",
        f"export GEMINI_API_KEY='{ph['gemini']}'",
        f"export GOOGLE_API_KEY='{ph['gemini']}'",
        f"# secret 'gw' (llm.example.com) has no standard variable; its placeholder: {ph['gw']}",
    ]
    assert run("env", "--shell", "fish")[1].splitlines()[0] == \
        f"set -gx ANTHROPIC_API_KEY '{ph['anthropic']}'"
    assert run("env", "--shell", "powershell")[1].splitlines()[0] == \
        f"$env:ANTHROPIC_API_KEY = '{ph['anthropic']}'"
    code, _, err = run("env", "--shell", "zsh")
    assert (code, err.strip()) == (2, "llmtap: --shell must be one of sh, fish, powershell, not 'zsh'")


def test_non_target_host_is_stored_with_a_warning(run):
    code, _, err = run("secrets", "set", "gw", "--host", "llm.example.com", stdin="gw-key")
    assert code == 0 and "llm.example.com is not a target" in err


def test_placeholders_are_shaped_like_real_keys_and_unguessable():
    shapes = {
        ("api.anthropic.com",): r"sk-ant-api03-[\w-]{93}AA",
        ("api.openai.com",): r"sk-proj-[\w-]{74}T3BlbkFJ[\w-]{74}",
        ("generativelanguage.googleapis.com",): r"AIza[\w-]{35}",
        ("api.groq.com",): r"gsk_[A-Za-z0-9]{52}",
        ("api.x.ai",): r"xai-[A-Za-z0-9]{80}",
        ("openrouter.ai",): r"sk-or-v1-[0-9a-f]{64}",
        ("llm.example.com",): r"sk-[A-Za-z0-9]{48}",
        ("bedrock-runtime.eu-west-3.amazonaws.com",): r"ABSK[A-Za-z0-9]{128}",
    }
    for hosts, shape in shapes.items():
        made = {provider_keys.make_placeholder(hosts, None) for _ in range(50)}
        assert len(made) == 50 and all(re.fullmatch(shape, p) for p in made)
    assert provider_keys.make_placeholder(("gw.example.com",), "sk-ant-api03-x").startswith("sk-ant-api03-")
    assert provider_keys.make_placeholder(("gw.example.com",), "ABSKQmVkcm9jaw").startswith("ABSK")
    assert provider_keys.env_vars("bedrock-runtime.us-east-1.amazonaws.com") == ("AWS_BEARER_TOKEN_BEDROCK",)


class MemoryKeyring(keyring.backend.KeyringBackend):
    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        self.entries = {("llmtap", "anthropic"): "sk-ant-api03-fromTheKeyring"}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.entries.pop((service, username), None)


def test_references_resolve_at_start_and_failures_name_the_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(references, "_AT_START", {})
    previous = keyring.get_keyring()
    keyring.set_keyring(MemoryKeyring())
    try:
        key_file = tmp_path / "key.txt"
        key_file.write_text("sk-from-a-file\n")
        monkeypatch.setenv("LLMTAP_REF_TEST", "sk-from-env")
        paths = store.StorePaths.under(tmp_path)
        store.ensure_directory(paths, os.getuid(), os.getgid())
        key = store.ensure_key(paths, os.getgid())
        refs = ["env:LLMTAP_REF_TEST", f"file:{key_file}", "keyring:llmtap/anthropic",
                "keyring:llmtap/nobody", "env:LLMTAP_REF_UNSET", "file:/nonexistent/key"]
        items = [store.new_secret(f"s{i}", ("api.openai.com",), "authorization", False, ref, key)
                 for i, ref in enumerate(refs)]
        store.write_store(paths, items, os.getgid())
        user = pwd.getpwuid(os.getuid()).pw_name
        references.resolve_at_start(tmp_path, os.getuid(), user)
    finally:
        keyring.set_keyring(previous)
    monkeypatch.setenv("LLMTAP_REF_TEST", "changed-after-start")
    key_file.write_text("changed-after-start")
    assert [references.resolve(r) for r in refs[:3]] == ["sk-from-env", "sk-from-a-file",
                                                    "sk-ant-api03-fromTheKeyring"]
    errors = {}
    for ref in refs[3:]:
        with pytest.raises(references.ResolutionError) as caught:
            references.resolve(ref)
        errors[ref] = str(caught.value)
    assert errors == {
        "keyring:llmtap/nobody": "no password for service 'llmtap', user 'nobody' in the keyring",
        "env:LLMTAP_REF_UNSET": "not set in the daemon's environment",
        "file:/nonexistent/key": "cannot read /nonexistent/key: No such file or directory",
    }
    with pytest.raises(references.ResolutionError, match="restart the daemon"):
        references.resolve("keyring:other/user")  # after the fork the worker cannot reach a keyring


def test_resolve_at_start_refuses_a_store_with_wrong_permissions(tmp_path):
    paths = store.StorePaths.under(tmp_path)
    store.ensure_directory(paths, os.getuid(), os.getgid())
    store.write_store(paths, [], os.getgid())
    paths.store.chmod(0o660)  # the group could write it
    with pytest.raises(store.UsageError, match=r"mode 0660 .* fix: sudo chown"):
        references.resolve_at_start(tmp_path, os.getuid(), "llmtap")


def test_a_user_who_cannot_read_the_store_is_told_to_use_sudo(run, monkeypatch):
    run("secrets", "set", "a", "--host", "api.anthropic.com", stdin=KEY)

    exists = Path.exists

    def denied(path: Path, **kwargs: bool) -> bool:
        if path.name == "secrets":  # as for anyone but root and llmtap: the state dir is 0700
            raise PermissionError(13, "Permission denied")
        return exists(path, **kwargs)

    monkeypatch.setattr(Path, "exists", denied)
    code, _, err = run("secrets", "list")
    assert code == 2 and err.strip().startswith("llmtap: cannot read the secret store in ")
    assert err.strip().endswith(": run it with sudo")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("tamper", ["store owned by the service user", "directory group-writable",
                                    "directory owned by the service user"])
def test_references_are_resolved_only_from_a_store_only_root_can_write(tmp_path, monkeypatch, tamper):
    monkeypatch.setenv("LLMTAP_UNIT_KEY", "sk-unit-resolved-value")
    paths = store.StorePaths.under(tmp_path)
    store.ensure_directory(paths, 0, 0)
    item = store.new_secret("a", ("api.anthropic.com",), "x-api-key", False, "env:LLMTAP_UNIT_KEY",
                            store.ensure_key(paths, 0))
    store.write_store(paths, [item], 0)
    monkeypatch.setattr(references, "_AT_START", {})
    references.resolve_at_start(tmp_path, 0, "root")
    assert references.resolve(item.ref or "") == "sk-unit-resolved-value"  # root's own store: trusted
    monkeypatch.setattr(references, "_AT_START", {})
    nobody = pwd.getpwnam("nobody").pw_uid
    if tamper == "store owned by the service user":
        os.chown(paths.store, nobody, -1)
    elif tamper == "directory group-writable":
        paths.directory.chmod(0o770)
    else:
        os.chown(paths.directory, nobody, -1)
    try:
        references.resolve_at_start(tmp_path, nobody, "nobody")
    except store.UsageError:  # refused outright: resolves nothing either
        assert tamper == "directory group-writable"
        return
    with pytest.raises(references.ResolutionError, match="not resolved with root's rights"):
        references.resolve(item.ref or "")
