"""Red-team attacks on llmtap's privilege and trust boundaries, each one a regression test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from llmtap import ca, price_data
from llmtap.errors import RuntimeFailure


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


def test_ca_setup_does_not_chown_a_symlinked_ca_dir(tmp_path: Path):
    """The service user owns state_dir and can replace `ca` by a symlink to /etc: the root
    supervisor's ensure_ca at the next start must not chown that directory to it."""
    victim = tmp_path / "etc"
    victim.mkdir(mode=0o755)
    state = tmp_path / "state"
    state.mkdir()
    (state / "ca").symlink_to(victim)
    with pytest.raises(RuntimeFailure):
        ca.ensure_ca(state / "ca", ("api.openai.com",), os.getuid(), os.getgid())
    assert victim.stat().st_mode & 0o777 == 0o755
    assert list(victim.iterdir()) == []


def test_ca_write_does_not_follow_a_planted_tmp_symlink(tmp_path: Path):
    """A symlink at the old fixed temporary name (install.json.llmtap-tmp) made root truncate,
    rewrite and chown whatever it pointed at."""
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$hash\n")
    os.chmod(secret, 0o600)
    (tmp_path / "install.json.llmtap-tmp").symlink_to(secret)
    ca.write_file(tmp_path / "install.json", b"{}", 0o644, os.getuid(), os.getgid())
    assert secret.read_bytes() == b"root:$6$hash\n"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "install.json").read_bytes() == b"{}"
