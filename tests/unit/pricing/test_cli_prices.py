"""`llmtap prices show|update|missing|import`, run in-process against a temporary state directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llmtap import price_data
from llmtap.cli import main
from llmtap.price_override import override_path, read_override


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


def test_show_names_the_row_rates_and_source(config: Path, capsys: pytest.CaptureFixture[str]):
    code, out, _ = run(capsys, "prices", "show", "claude-sonnet-4-5-20250929", "--config", str(config))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "anthropic/claude-sonnet-4-5 (for 'claude-sonnet-4-5-20250929')"
    assert "  input_mtok: 3 (above 200000: 6)" in lines
    assert "  cache_write_1h_mtok: 6 (above 200000: 12)" in lines
    assert lines[-1] == f"  source: genai-prices {price_data.bundled().version}"
    code, out, _ = run(capsys, "prices", "show", "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "--host",
                       "bedrock-runtime.us-east-1.amazonaws.com", "--json", "--config", str(config))
    shown = json.loads(out)
    assert shown["row"].startswith("aws/") and shown["source"] == "genai-prices"


def test_unknown_model_is_a_one_line_failure(config: Path, capsys: pytest.CaptureFixture[str]):
    code, out, err = run(capsys, "prices", "show", "mystery-1", "--config", str(config))
    assert (code, out) == (1, "")
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("llmtap: no price for model 'mystery-1': its calls are recorded with cost_usd null")
    assert "llmtap prices update" in err


def test_update_stores_fetched_prices_that_show_uses(config: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]):
    source = tmp_path / "data.json"
    source.write_text(json.dumps([{
        "id": "openai", "name": "OpenAI", "api_pattern": "https://api\\.openai\\.com",
        "models": [{"id": "gpt-mystery", "match": {"equals": "gpt-mystery"},
                    "prices": {"input_mtok": 7, "output_mtok": 9}}]}]))
    code, out, _ = run(capsys, "prices", "update", "--url", source.as_uri(), "--config", str(config))
    assert code == 0 and out.startswith(f"prices updated: 1 models from {source.as_uri()}")
    code, out, _ = run(capsys, "prices", "show", "gpt-mystery", "--config", str(config))
    assert "input_mtok: 7" in out and "source: genai-prices fetched " in out
    source.write_text("not json")
    code, _, err = run(capsys, "prices", "update", "--url", source.as_uri(), "--config", str(config))
    assert code == 1 and "was not stored: not genai-prices data" in err and len(err.splitlines()) == 1
    code, _, err = run(capsys, "prices", "update", "--url", "https://127.0.0.1:9/none.json",
                       "--config", str(config))
    assert code == 1 and err.startswith("llmtap: cannot update prices: https://127.0.0.1:9/none.json:")


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
    imported = read_override(override)
    assert imported is not None and "mystery-1" in imported.models
    code, out, _ = run(capsys, "prices", "show", "mystery-1", "--config", str(config))
    assert "input 0.4, output 1.6" in out and "source: override litellm:model_prices.json" in out
    code, out, _ = run(capsys, "prices", "show", "claude-opus-4-1", "--config", str(config))
    assert "source: genai-prices" in out  # the maintained rows stay underneath


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
