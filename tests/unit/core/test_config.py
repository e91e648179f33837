from __future__ import annotations

from pathlib import Path

import pytest
from llmtap.cli import main
from llmtap.config import DEFAULT_TARGET_HOSTS, load_config
from llmtap.errors import UsageError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_when_the_default_file_is_absent(monkeypatch):
    monkeypatch.delenv("LLMTAP_CONFIG", raising=False)
    monkeypatch.setattr("llmtap.config.DEFAULT_CONFIG_PATH", Path("/nonexistent/config.toml"))
    config = load_config(None)
    assert config.redirect.scope == "targets" and config.redirect.proxy_port == 8443
    assert config.targets.all_hosts == DEFAULT_TARGET_HOSTS


def test_full_file_is_read(tmp_path):
    config = load_config(write(tmp_path, f"""
        state_dir = "{tmp_path}/s"
        [redirect]
        backend = "iptables"
        scope = "all"
        ports = [443, 8443]
        proxy_port = 9443
        block_quic = false
        [targets]
        extra_hosts = ["Gateway.Example.com"]
    """))
    assert config.state_dir == tmp_path / "s"
    assert config.redirect.ports == (443, 8443) and config.redirect.proxy_port == 9443
    assert config.targets.all_hosts[-1] == "gateway.example.com"


@pytest.mark.parametrize(("text", "message"), [
    ("colour = 1", "unknown config key 'colour'"),
    ("[redirect]\nbackend = 'pf2'", "redirect.backend must be one of"),
    ("[redirect]\nscop = 'all'", "unknown config key 'redirect.scop'"),
    ("[redirect]\nproxy_port = '8443'", "config key 'redirect.proxy_port' must be an integer"),
    ("[redirect]\nblock_quic = 1", "config key 'redirect.block_quic' must be true or false"),
    ("[redirect]\nports = [443]\nproxy_port = 443", "must not be one of redirect.ports"),
    ("[targets]\nhosts = ['not a host']", "'not a host' is not a valid host name"),
    ("[upstream]\nextra_ca = '/nonexistent.pem'", "upstream.extra_ca: /nonexistent.pem is not a file"),
    ("redirect = 3", "config key 'redirect' must be a table"),
    ("[prices]\nupdate_hours = -1", "prices.update_hours must be 0 (off) or more"),
    ("[prices]\nurl = 'http://example.com/p.json'", "prices.url must be an https:// (or file:) URL"),
    ("x = [", "is not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    with pytest.raises(UsageError, match=None) as caught:
        load_config(write(tmp_path, text))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_named_config_must_exist():
    with pytest.raises(UsageError, match="does not exist"):
        load_config("/nonexistent/llmtap.toml")


def test_cli_reports_bad_config_in_one_line_with_exit_2(tmp_path, capsys):
    assert main(["run", "--config", str(write(tmp_path, "bogus = true"))]) == 2
    assert capsys.readouterr().err == "llmtap: unknown config key 'bogus'\n"


def test_cli_refuses_without_root(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert main(["run", "--config", str(write(tmp_path, ""))]) == 2
    assert capsys.readouterr().err == "llmtap: llmtap run needs root: run it with sudo\n"
    assert main(["cleanup", "--config", str(write(tmp_path, ""))]) == 2
