"""`llmtap budget|limit set|list|rm` (no daemon: spend from the records index), the alerts'
delivery, and the [budgets] config."""

from __future__ import annotations

import datetime
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from llmtap import alerts, cli
from llmtap.budgets import load_policy
from llmtap.config import load_config
from llmtap.errors import UsageError
from llmtap.platform.runner import Completed
from llmtap.records.index import Index, index_path, row_of


def run(capsys: Any, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def config(tmp_path: Path) -> str:
    (tmp_path / "state").mkdir(mode=0o700)
    path = tmp_path / "config.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\nrecords_dir = "{tmp_path / "records"}"\n'
                    f'run_dir = "{tmp_path / "run"}"\n')
    return str(path)


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)


def test_set_changes_only_the_options_given_and_rm_removes(capsys, config, as_root, tmp_path):
    code, out, _ = run(capsys, "budget", "set", "work", "--daily", "5", "--secret", "anthropic-work",
                       "--alert-at", "50", "--config", config)
    assert code == 0 and out.strip() == ("budget work: $5.00 a day for secret anthropic-work, "
                                         "action block, alert at 50%")
    # the refusal's advice (`budget set NAME --daily X`) keeps the selectors and the rest
    assert run(capsys, "budget", "set", "work", "--daily", "8", "--monthly", "100",
               "--config", config)[0] == 0
    policy = load_policy(tmp_path / "state")
    (work,) = policy.budgets
    assert (work.daily, work.monthly, work.alert_at, work.where.secret) == (8, 100, 50, "anthropic-work")
    file = tmp_path / "state" / "budgets.json"
    assert oct(file.stat().st_mode & 0o777) == "0o644"
    assert run(capsys, "limit", "set", "agents", "--rpm", "30", "--process", "node",
               "--config", config)[0] == 0
    assert run(capsys, "limit", "set", "agents", "--tpm", "9000", "--config", config)[0] == 0
    (agents,) = load_policy(tmp_path / "state").limits
    assert (agents.rpm, agents.tpm, agents.where.process) == (30, 9000, "node")
    code, out, _ = run(capsys, "limit", "list", "--config", config)
    assert "agents: 0/30 calls, 0/9000 tokens in the last minute [process node]" in out
    assert run(capsys, "budget", "rm", "work", "--config", config)[0] == 0
    code, _, err = run(capsys, "budget", "rm", "work", "--config", config)
    assert code != 0 and err.strip() == "llmtap: no budget 'work' (see `llmtap budget list`)"
    assert run(capsys, "limit", "rm", "agents", "--config", config)[0] == 0
    assert json.loads(file.read_text()) == {"version": 1, "budgets": [], "limits": []}


@pytest.mark.parametrize(("args", "message"), [
    (("budget", "set", "x"), "a budget needs --daily or --monthly (USD)"),
    (("budget", "set", "x", "--daily", "0"), "--daily must be an amount of USD above 0, not 0.0"),
    (("budget", "set", "x", "--daily", "nan"), "--daily must be an amount of USD above 0, not nan"),
    (("budget", "set", "x", "--daily", "1", "--action", "warn"), "--action must be one of block"),
    (("budget", "set", "x", "--daily", "1", "--alert-at", "120"), "--alert-at must be a percentage"),
    (("budget", "set", "../x", "--daily", "1"), "name '../x': use 1-64 letters"),
    (("budget", "set", "x", "--daily", "1", "--model", " "), "--model must be a non-empty"),
    (("limit", "set", "x"), "a limit needs --rpm or --tpm"),
    (("limit", "set", "x", "--rpm", "-1"), "--rpm must be a whole number from 1"),
])
def test_bad_input_is_one_line_and_changes_nothing(capsys, config, as_root, tmp_path, args, message):
    code, _, err = run(capsys, *args, "--config", config)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "state" / "budgets.json").exists()


def test_only_root_changes_them(capsys, config, monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for args in (("budget", "set", "x", "--daily", "1"), ("budget", "rm", "x"),
                 ("limit", "set", "x", "--rpm", "1"), ("limit", "rm", "x")):
        code, _, err = run(capsys, *args, "--config", config)
        assert code != 0 and "needs root: run it with sudo" in err
    assert not (tmp_path / "state" / "budgets.json").exists()


def test_list_without_a_daemon_reads_the_spend_from_the_index(capsys, config, as_root, tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    index = Index.open_writer(index_path(records))
    now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
    index.add([row_of({"id": "a", "started_at": now, "cost_usd": 1.25, "model": "gpt-4.1"}, "a.json"),
               row_of({"id": "b", "started_at": now, "cost_usd": 3.0, "model": "o3"}, "b.json")])
    index.close()
    run(capsys, "budget", "set", "gpt", "--daily", "5", "--model", "gpt-*", "--config", config)
    code, out, _ = run(capsys, "budget", "list", "--config", config)
    assert code == 0 and out.startswith("gpt: $1.25 of $5.00 today (25%) [model gpt-*; block")
    rows = json.loads(run(capsys, "budget", "list", "--json", "--config", config)[1])
    assert rows[0]["spent_month"] == 1.25 and rows[0]["in_flight"] is None


def test_a_broken_policy_file_is_one_line(capsys, config, as_root, tmp_path):
    (tmp_path / "state" / "budgets.json").write_text("{")
    code, _, err = run(capsys, "budget", "list", "--config", config)
    assert code != 0 and err.startswith("llmtap: budgets.json is not valid JSON")


def test_the_webhook_must_be_https(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[budgets]\nwebhook = "http://hooks.example/x"\n')
    with pytest.raises(UsageError, match=r"budgets\.webhook must be an https:// URL"):
        load_config(path)
    path.write_text('[budgets]\nwebhook = "https://hooks.example/x"\n')
    assert load_config(path).budgets.webhook == "https://hooks.example/x"


def test_alerts_go_to_the_desktop_with_the_text_as_an_argument(monkeypatch):
    monkeypatch.setattr(alerts.shutil, "which", lambda name: f"/usr/bin/{name}")
    text = 'budget "x" at 80%; $(rm -rf /)'
    assert alerts.desktop_command(text, "linux") == [
        "notify-send", "--app-name=llmtap", "llmtap budget", text]
    mac = alerts.desktop_command(text, "darwin")
    assert mac is not None and mac[-1] == text and all(text not in part for part in mac[:-1])
    monkeypatch.setattr(alerts.shutil, "which", lambda name: None)
    assert alerts.desktop_command(text, "linux") is None


def test_deliver_runs_off_the_callers_thread_and_only_alerts(monkeypatch):
    monkeypatch.setattr(alerts.shutil, "which", lambda name: f"/usr/bin/{name}")
    seen: list[list[str]] = []
    done = threading.Event()

    def runner(argv: list[str], stdin: str | None = None) -> Completed:
        seen.append(argv)
        done.set()
        return Completed(0)

    alerts.deliver([{"type": "end"}, {"type": "alert", "message": "m"}], runner=runner)
    assert done.wait(5) and seen == [["notify-send", "--app-name=llmtap", "llmtap budget", "m"]]


def test_the_webhook_refuses_plain_http():
    with pytest.raises(ValueError, match="https"):
        alerts.post("http://127.0.0.1:9/x", {"type": "alert"})


def test_the_dashboard_shows_budgets_limits_and_alerts():
    from llmtap.config import Config
    from llmtap.dashboard import State
    from llmtap.dashboard_view import render
    from rich.console import Console

    state = State(Config(), connected=True)
    state.apply({"type": "counters", "counters": {"requests": 1, "policy": [
        {"kind": "budget", "name": "work", "daily": 5.0, "monthly": None, "spent_today": 5.5,
         "spent_month": 5.5, "in_flight": 0.25, "where": "secret work", "action": "block",
         "alert_at": 80.0},
        {"kind": "limit", "name": "agents", "rpm": 30, "tpm": None, "calls_last_minute": 4,
         "tokens_last_minute": 900, "where": "process node"}]}})
    state.apply({"type": "alert", "message": "llmtap: budget 'work' at 110% of its daily $5.00"})
    console = Console(record=True, width=150, height=40, color_system=None)
    console.print(render(state, 150))
    text = console.export_text()
    for expected in ("budget work $5.50/$5.00 today +$0.2500 in flight", "limit agents 4/30 rpm",
                     "llmtap: budget 'work' at 110% of its daily $5.00"):
        assert expected in text, expected
