"""The CLI run in this process, on a config of temporary folders: exit code and output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmtap import cli


def write_config(tmp_path: Path, records: Path, extra: str = "") -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nrecords_dir = "{records}"\n'
                      f'run_dir = "{tmp_path / "run"}"\n{extra}')
    return config


def run_cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(args))
    except SystemExit as exc:  # click's own exit (0, or 2 for its usage errors)
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
