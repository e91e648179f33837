"""`llmtap prices show|import`, run in-process against a temporary state directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llmtap.cli import main
from llmtap.pricing import effective_table, override_path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\nrecords_dir = "{tmp_path / "records"}"\n')
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:  # click ends a successful command this way
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_show_resolves_aliases_and_snapshots(config: Path, capsys: pytest.CaptureFixture[str]):
    code, out, _ = run(capsys, "prices", "show", "claude-sonnet-4-5-20250929", "--config", str(config))
    assert code == 0
    assert out.splitlines()[:3] == [
        "claude-sonnet-4-5 (for 'claude-sonnet-4-5-20250929'): anthropic",
        "  USD per 1M tokens: input 3, output 15, cache read 0.3, cache write 5m 3.75, cache write 1h 6",
        "  above 200000 prompt tokens: input 6, output 22.5, cache read 0.6, cache write 5m 7.5, "
        "cache write 1h 12",
    ]
    code, out, _ = run(capsys, "prices", "show", "openai/gpt-4o-2024-08-06", "--json", "--config",
                       str(config))
    shown = json.loads(out)
    assert (shown["row"], shown["usd_per_1m_tokens"]["input"], shown["table"]["source"]) == (
        "gpt-4o", "2.5", "shipped")


def test_unknown_model_is_a_one_line_failure(config: Path, capsys: pytest.CaptureFixture[str]):
    code, out, err = run(capsys, "prices", "show", "mystery-1", "--config", str(config))
    assert (code, out) == (1, "")
    assert err.strip().splitlines() == [
        "llmtap: no price for model 'mystery-1': its calls are recorded with cost_usd null "
        "(add it with `llmtap prices import FILE`)"]


def test_import_writes_an_override_that_wins(config: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]):
    litellm = tmp_path / "model_prices.json"
    litellm.write_text(json.dumps({
        "sample_spec": {"litellm_provider": "openai", "mode": "chat"},
        "mystery-1": {"litellm_provider": "openai", "mode": "chat",
                      "input_cost_per_token": 4e-07, "output_cost_per_token": 1.6e-06},
        "bedrock/mystery-1": {"litellm_provider": "bedrock", "input_cost_per_token": 1,
                              "output_cost_per_token": 1},
    }))
    code, out, _ = run(capsys, "prices", "import", str(litellm), "--config", str(config))
    assert code == 0 and out.startswith(f"imported 1 model prices from {litellm}")
    override = override_path(tmp_path / "state")
    assert override.stat().st_mode & 0o777 == 0o644
    table, imported = effective_table(override)
    assert imported is not None and "mystery-1" in imported.models
    assert table.price("claude-opus-4-1") is not None  # the shipped rows stay underneath
    code, out, _ = run(capsys, "prices", "show", "mystery-1", "--config", str(config))
    assert "input 0.4, output 1.6" in out and "table: override litellm:model_prices.json" in out


@pytest.mark.parametrize(("content", "message"), [
    (None, "is not a file"),
    ("{", "is not valid JSON"),
    ("[1, 2]", "is not a LiteLLM price file"),
    ('{"x": {"litellm_provider": "azure"}}', "has no usable prices"),
])
def test_import_refuses_bad_files(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  content: str | None, message: str):
    path = tmp_path / "prices-in.json"
    if content is not None:
        path.write_text(content)
    code, _, err = run(capsys, "prices", "import", str(path), "--config", str(config))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not override_path(tmp_path / "state").exists()
