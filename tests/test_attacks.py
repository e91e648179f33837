"""Red-team attacks on llmtap's privilege and trust boundaries, each one a regression test."""

from __future__ import annotations

import os
from pathlib import Path

from llmtap import price_data


def test_price_write_does_not_follow_a_planted_tmp_symlink(tmp_path: Path):
    """The state directory belongs to the service user; root's `prices update`/`import` write
    there. A symlink the service user planted at the temporary name must not make root
    overwrite, chmod 0644 or chown the file it points at (/etc/shadow)."""
    state = tmp_path / "state"
    state.mkdir()
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$hash\n")
    os.chmod(secret, 0o600)
    (state / ".genai-prices.json.tmp").symlink_to(secret)
    price_data.write_public(state / "genai-prices.json", b"{}", None)
    assert secret.read_bytes() == b"root:$6$hash\n"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (state / "genai-prices.json").read_bytes() == b"{}"
    assert not (state / "genai-prices.json").is_symlink()
