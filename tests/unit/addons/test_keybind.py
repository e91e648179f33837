"""Keys bound to programs: the matching rules (llmtap.keybind), `secrets set --allow-*` checks,
and the credentials stage's decision for a bound secret (in process, attribution faked)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from llmtap import cli, keybind
from llmtap import secrets_store as store
from llmtap.addons.credentials import Credentials
from llmtap.errors import UsageError
from llmtap.flow import fields
from mitmproxy import http
from mitmproxy.test import taddons, tflow

KEY = "sk-ant-api03-THEREALKEYvalue0123456789wxyz"
CURL = "/opt/bin/curl"
NODE, CLI_JS = "/usr/bin/node", "/usr/lib/node_modules/@anthropic-ai/claude-code/cli.js"


def proc(exe: str, user: str = "alice", script: str | None = None, parents: list[Any] | None = None,
         **extra: Any) -> dict[str, Any]:
    return {"pid": 4242, "exe": exe, "user": user, "script": script, "parents": parents or [], **extra}


EXE = keybind.Binding(exes=frozenset({CURL}))
SCRIPT = keybind.Binding(scripts=frozenset({(NODE, CLI_JS)}))
USER = keybind.Binding(users=frozenset({"alice"}))


@pytest.mark.parametrize(("binding", "process", "allowed"), [
    (keybind.UNBOUND, None, True),  # unbound: today's behaviour, whoever it is
    (EXE, proc(CURL), True),
    (EXE, proc("/usr/bin/curl"), False),  # a copy elsewhere, or what a symlink named curl points to
    (EXE, proc("/opt/bin/curl2"), False),
    (EXE, proc(CURL, name="curl", cmdline="curl"), True),
    (EXE, proc("/usr/bin/python3", name="curl", cmdline="/opt/bin/curl"), False),  # argv[0] says nothing
    (EXE, None, False),  # attribution not known in time
    (EXE, {"pid": None}, False),
    (EXE, proc(CURL, shared=True), False),  # its parent holds the socket too
    (EXE, proc(CURL, foreign_root=True), False),  # a container's /opt/bin/curl is another file
    (SCRIPT, proc(NODE, script=CLI_JS), True),
    (SCRIPT, proc(NODE, script="/tmp/evil.js"), False),  # the interpreter, another script
    (SCRIPT, proc(NODE), False),  # node -e … / node -r x.js cli.js: no script named
    (SCRIPT, proc("/usr/local/bin/bun", script=CLI_JS), False),
    (USER, proc("/anything"), True),
    (USER, proc("/anything", user="mallory"), False),
    (USER, proc("/anything", user=None), False),
    (dataclasses.replace(EXE, users=frozenset({"alice"})), proc(CURL, user="mallory"), False),
    (dataclasses.replace(EXE, users=frozenset({"alice"})), proc(CURL), True),
    # The parent chain counts only with --allow-children.
    (EXE, proc("/usr/bin/python3", parents=[{"pid": 9, "exe": CURL}]), False),
    (dataclasses.replace(EXE, children=True),
     proc("/usr/bin/python3", parents=[{"pid": 9, "exe": CURL}]), True),
    (dataclasses.replace(SCRIPT, children=True),
     proc("/bin/sh", parents=[{"pid": 9, "exe": NODE, "script": CLI_JS}]), True),
    (dataclasses.replace(EXE, children=True), proc("/usr/bin/python3", parents="junk"), False),
])
def test_binding_matches_real_paths_scripts_and_users(binding, process, allowed):
    assert (binding.check(process) is None) is allowed


def test_a_refusal_names_what_connected():
    why = EXE.check(proc("/usr/bin/curl", script="/tmp/x"))
    assert why == "it came from /usr/bin/curl /tmp/x (pid 4242, user alice)"
    assert EXE.check(None) == "the process that connected could not be determined in time"
    assert "shared with its parent" in (EXE.check(proc(CURL, shared=True)) or "")
    both = keybind.Binding(exes=frozenset({CURL}), scripts=frozenset({(NODE, CLI_JS)}),
                           users=frozenset({"bob", "alice"}), children=True)
    assert both.rule() == (f"programs {CURL}, {NODE} {CLI_JS} (or a parent of it) and users alice, bob")
    assert keybind.UNBOUND.rule() == "anyone" and not keybind.UNBOUND.bound


def test_set_time_checks_resolve_real_paths_and_refuse_in_one_line(tmp_path):
    real = tmp_path / "tool"
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    link = tmp_path / "claude"
    link.symlink_to(real)
    assert keybind.check_exes([str(link), str(real)]) == (str(real),)  # bound to the target
    script = tmp_path / "cli.js"
    script.write_text("")
    assert keybind.check_scripts([f"{link}:{script}"]) == ((str(real), str(script)),)
    assert keybind.check_users(["root", "0"]) == ("root",)
    for call, message in (
        (lambda: keybind.check_exes([str(tmp_path / "nope")]),
         f"--allow-exe '{tmp_path}/nope': no such file"),
        (lambda: keybind.check_exes([str(tmp_path)]), f"--allow-exe '{tmp_path}': not a file ({tmp_path})"),
        (lambda: keybind.check_exes([str(script)]), f"--allow-exe '{script}': not executable ({script})"),
        (lambda: keybind.check_scripts([str(real)]), f"--allow-script '{real}': write INTERPRETER:SCRIPT, "
         "e.g. /usr/bin/node:/usr/lib/node_modules/@anthropic-ai/claude-code/cli.js"),
        (lambda: keybind.check_scripts([f"{real}:{tmp_path}/gone.js"]),
         f"--allow-script '{tmp_path}/gone.js': no such file"),
        (lambda: keybind.check_users(["no-such-user-here"]),
         "--allow-user 'no-such-user-here': no such user"),
    ):
        with pytest.raises(UsageError) as caught:
            call()
        assert str(caught.value) == message


@pytest.fixture
def run(config, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        try:
            code = cli.main([*argv, "--config", str(config)])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_cli_stores_lists_keeps_and_drops_bindings(run, config, tmp_path):
    curl = tmp_path / "bin" / "curl"
    curl.parent.mkdir()
    shutil.copy("/usr/bin/true", curl)
    host = ("--host", "api.anthropic.com")
    code, out, err = run("secrets", "set", "a", *host, "--allow-exe", str(curl), "--allow-user", "root",
                         stdin=KEY)
    assert code == 0, err
    assert f"bound to: programs {curl} and users root" in out
    listed = run("secrets", "list")[1]
    assert f"bound to:    programs {curl} and users root" in listed
    row = json.loads(run("secrets", "list", "--json")[1])[0]
    assert (row["allow_exes"], row["allow_users"], row["allow_children"]) == ([str(curl)], ["root"], False)
    stored = json.loads((config.parent / "state" / "secrets" / "secrets.json").read_text())
    assert stored["secrets"][0]["allow_exes"] == [str(curl)]
    # A rotation keeps the bindings unless new ones are given; --unbind drops them.
    assert run("secrets", "set", "a", "--replace", stdin=KEY + "x")[0] == 0
    assert json.loads(run("secrets", "list", "--json")[1])[0]["allow_exes"] == [str(curl)]
    assert run("secrets", "set", "a", "--replace", "--unbind", stdin=KEY)[0] == 0
    assert json.loads(run("secrets", "list", "--json")[1])[0]["bound_to"] == "anyone"


@pytest.mark.parametrize(("argv", "message"), [
    (("--allow-exe", "/no/such/claude"), "llmtap: --allow-exe '/no/such/claude': no such file"),
    (("--allow-user", "nobody-at-all-x"), "llmtap: --allow-user 'nobody-at-all-x': no such user"),
    (("--allow-children",), "llmtap: --allow-children goes with --allow-exe or --allow-script"),
    (("--unbind", "--allow-user", "root"), "llmtap: --unbind drops the bindings: give it alone, without "
     "--allow-*"),
])
def test_cli_bad_bindings_are_one_line_with_exit_2(run, argv, message):
    code, out, err = run("secrets", "set", "s", "--host", "api.anthropic.com", *argv, stdin=KEY)
    assert (code, err.strip(), out) == (2, message, "")


# --- the credentials stage ---


class Answers:
    """Attribution faked: the answer in already, or still to come (a future), or never."""

    def __init__(self, process: dict[str, Any] | None, later: bool = False) -> None:
        self.process, self.later = process, later
        self.future: asyncio.Future[Any] | None = None

    def process_of(self, flow: http.HTTPFlow) -> dict[str, Any] | None:
        return None if self.later else self.process

    def pending(self, flow: http.HTTPFlow) -> asyncio.Future[Any] | None:
        if not self.later:
            return None
        self.future = asyncio.get_running_loop().create_future()
        if self.process is not None:
            asyncio.get_running_loop().call_later(0.05, self.future.set_result, self.process)
        return self.future


def bound_store(state_dir: Path, **binding: Any) -> str:
    paths = store.StorePaths.under(state_dir)
    store.ensure_directory(paths, os.getuid(), os.getgid())
    key = store.ensure_key(paths, os.getgid())
    secret = store.new_secret("claude", ("api.anthropic.com",), "x-api-key", False, KEY, key)
    store.write_store(paths, [dataclasses.replace(secret, **binding)], os.getgid())
    return secret.placeholder


def sent(tmp_path: Path, attribution: Answers, **binding: Any) -> http.HTTPFlow:
    placeholder = bound_store(tmp_path, **binding)
    addon = Credentials(attribution=attribution)  # type: ignore[arg-type]
    with taddons.context(addon) as tctx:
        tctx.configure(addon, llmtap_state_dir=str(tmp_path))
        request = http.Request.make("POST", "https://api.anthropic.com/v1/messages", b"{}",
                                    {"x-api-key": placeholder, "host": "api.anthropic.com"})
        flow = tflow.tflow(req=request)
        flow.client_conn.sni = "api.anthropic.com"
        flow.client_conn.tls = flow.server_conn.tls = True
        flow.server_conn.address, flow.server_conn.sni = ("api.anthropic.com", 443), None

        async def hook() -> None:
            result = addon.requestheaders(flow)
            if result is not None:
                await result

        asyncio.run(hook())
    return flow


@pytest.mark.parametrize("later", [False, True])
def test_the_allowed_program_gets_the_key_and_the_record_says_so(tmp_path, later):
    flow = sent(tmp_path, Answers(proc(CURL), later), allow_exes=(CURL,))
    assert flow.response is None and flow.request.headers["x-api-key"] == KEY
    assert fields(flow)["credential_decision"] == {
        "secret": "claude", "decision": "injected", "rule": f"programs {CURL}"}


@pytest.mark.parametrize(("answers", "reason"), [
    (Answers(proc("/usr/bin/curl")), "it came from /usr/bin/curl (pid 4242, user alice)"),
    (Answers(None), "the process that connected could not be determined in time"),
    (Answers(None, later=True), "the process that connected could not be determined in time"),
])
def test_anyone_else_gets_a_403_naming_the_rule_and_nothing_goes_out(tmp_path, answers, reason,
                                                                     monkeypatch):
    monkeypatch.setattr("llmtap.addons.keygate.WAIT_S", 0.2)
    flow = sent(tmp_path, answers, allow_exes=(CURL,))
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.request.headers["x-api-key"] != KEY  # the placeholder, as the client sent it
    error = json.loads(flow.response.content or b"")["error"]
    assert error["type"] == "permission_error"
    assert error["message"] == (f"llmtap refused the key of secret 'claude': it is only added for "
                                f"programs {CURL}, and {reason}")
    assert fields(flow)["credential_decision"] == {
        "secret": "claude", "decision": "refused", "rule": f"programs {CURL}", "reason": reason}
    assert KEY not in json.dumps(fields(flow))


def test_an_unbound_secret_records_no_decision(tmp_path):
    flow = sent(tmp_path, Answers(None))
    assert flow.request.headers["x-api-key"] == KEY and "credential_decision" not in fields(flow)


def test_the_supervisor_names_the_script_an_interpreter_runs_as_a_real_path(tmp_path):
    import subprocess
    import sys

    from llmtap import proclookup

    script = tmp_path / "real" / "agent.py"
    script.parent.mkdir()
    script.write_text("import time; time.sleep(30)\n")
    (tmp_path / "link.py").symlink_to(script)
    runs = {("link.py",): str(script), ("-c", "import time; time.sleep(30)"): None,
            ("-W", "ignore", str(script)): None}  # an option first: code may run that is not the script
    for argv, expected in runs.items():
        child = subprocess.Popen([sys.executable, *argv], cwd=tmp_path)
        try:
            info = proclookup.describe(child.pid)
            assert info is not None
            assert (info["script"], info["exe"], info["uid"]) == (expected, os.path.realpath(sys.executable),
                                                                  os.getuid())
        finally:
            child.kill()
            child.wait()


CONNECT_FROM = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.connect(("127.0.0.1", int(sys.argv[2])))
print("connected", flush=True)
sys.stdin.read()
"""


def free_port_below_the_ephemeral_range() -> int:
    """One no connection elsewhere on the machine will take meanwhile (it is not ephemeral)."""
    import random
    import socket

    while True:
        port = random.randrange(20000, 30000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def test_a_port_rebound_by_another_process_does_not_inherit_the_first_ones_answer():
    """The supervisor's short cache is keyed by the socket too: a process that binds the local
    port another one just left (SO_REUSEADDR) is looked up afresh, not taken for the first."""
    import socket
    import subprocess
    import sys

    from llmtap import proclookup

    servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    port = free_port_below_the_ephemeral_range()
    lookup = proclookup.Lookup()
    found = []
    for server in servers:
        argv = [sys.executable, "-c", CONNECT_FROM, str(port), str(server.getsockname()[1])]
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "connected"
            found.append((child.pid, (lookup.find("127.0.0.1", port) or {}).get("pid")))
        finally:
            child.kill()
            child.wait()
    for server in servers:
        server.close()
    assert [pid for pid, _ in found] == [looked for _, looked in found]


@pytest.mark.parametrize(("exe", "added"), [(CURL, True), ("/usr/bin/curl", False)])
def test_when_absent_adds_a_bound_key_only_for_the_bound_program(tmp_path, exe, added):
    paths = store.StorePaths.under(tmp_path)
    store.ensure_directory(paths, os.getuid(), os.getgid())
    key = store.ensure_key(paths, os.getgid())
    secret = store.new_secret("claude", ("api.anthropic.com",), "x-api-key", True, KEY, key,
                              for_users=("alice",))
    store.write_store(paths, [dataclasses.replace(secret, allow_exes=(CURL,))], os.getgid())
    addon = Credentials(attribution=Answers(proc(exe)))  # type: ignore[arg-type]
    with taddons.context(addon) as tctx:
        tctx.configure(addon, llmtap_state_dir=str(tmp_path))
        flow = tflow.tflow(req=http.Request.make("POST", "https://api.anthropic.com/v1/messages", b"{}",
                                                 {"host": "api.anthropic.com"}))
        flow.client_conn.sni = "api.anthropic.com"
        flow.client_conn.tls = flow.server_conn.tls = True
        flow.server_conn.address, flow.server_conn.sni = ("api.anthropic.com", 443), None
        result = addon.requestheaders(flow)
        assert result is not None
        asyncio.run(result)  # type: ignore[arg-type]
    # Another program is sent on without a key (as another user would be), not refused.
    assert flow.response is None
    assert (flow.request.headers.get("x-api-key") == KEY) is added
    assert ("credential_decision" in fields(flow)) is added
