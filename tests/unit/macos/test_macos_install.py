"""`llmtap install` on macOS: its provider is chosen, and refuses before any change until its
steps are assembled (issue: macOS and Windows as complete as Linux)."""

from __future__ import annotations

from pathlib import Path

import pytest
from llmtap.config import load_config
from llmtap.errors import UsageError
from llmtap.install import provider_for
from llmtap.install.macos import MacInstaller


def config_in(tmp_path: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nrecords_dir = "{tmp_path / "records"}"\n'
                      f'run_dir = "{tmp_path / "run"}"\n')
    return config


def test_macos_gets_its_own_provider(tmp_path: Path) -> None:
    assert isinstance(provider_for(load_config(config_in(tmp_path)), None, platform="darwin"),
                      MacInstaller)


def test_macos_refuses_before_any_change(tmp_path: Path) -> None:
    config = load_config(config_in(tmp_path))
    with pytest.raises(UsageError, match="needs root"):
        MacInstaller(config, is_root=lambda: False).install()
    installer = MacInstaller(config, is_root=lambda: True)
    for action in (installer.install, installer.uninstall, installer.rotate):
        with pytest.raises(UsageError, match="does not support macOS yet"):
            action()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]
