"""The lock is what runs: the test venv and what installers/install.sh installs hold exactly the
versions in requirements/*.txt, and the installed daemon decodes every content-encoding."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import paths
import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = paths.REPO
LOCK_LINE = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)(?:\s*;\s*([^\\]+?))?\s*\\?$", re.M)


def locked(*sets: str) -> dict[str, str]:
    """name -> version for the lock lines whose markers hold here (scripts/find-python.sh picks
    the interpreter that runs the tests)."""
    pins: dict[str, str] = {}
    for name in sets:
        text = (ROOT / "requirements" / f"{name}.txt").read_text()
        for package, version, marker in LOCK_LINE.findall(text):
            if not marker or Marker(marker).evaluate():
                pins[canonicalize_name(package)] = version
    return pins


def installed(python: str) -> dict[str, str]:
    script = ("import json, importlib.metadata as md;"
              "print(json.dumps({d.metadata['Name']: d.version for d in md.distributions()}))")
    versions = json.loads(_run(python, "-c", script))
    named = {canonicalize_name(k): v for k, v in versions.items()}
    return {k: v for k, v in named.items() if k not in ("pip", "llmtap")}


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def test_the_test_environment_is_the_lock() -> None:
    assert installed(sys.executable) == locked("build", "test")


def test_every_declared_dependency_is_in_the_product_lock() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = locked("product")
    for line in declared:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate():
            assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)]), line


DECODE_EVERY_ENCODING = """
import gzip, zlib, brotli
from llmtap.parsers.encoding import decode_all, zstd
body = b'{"usage": {"input_tokens": 3}}' * 1000
for name, encode in [("gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress),
                     ("zstd", zstd.compress)]:
    assert decode_all(encode(body), name, 1 << 20) == body, name
print("ok")
"""


@pytest.mark.root
def test_install_script_installs_exactly_the_product_lock(tmp_path: Path) -> None:
    prefix, bin_dir = tmp_path / "opt", tmp_path / "bin"
    bin_dir.mkdir()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LLMTAP_PREFIX": str(prefix),
           "LLMTAP_BIN_DIR": str(bin_dir)}
    done = subprocess.run([str(ROOT / "installers/install.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    python = str(prefix / "bin/python")
    assert installed(python) == locked("build", "product")
    assert _run(str(bin_dir / "llmtap"), "--version").strip()
    assert _run(python, "-c", DECODE_EVERY_ENCODING).strip() == "ok"
    # A second run over a venv that gained a stray package puts it back to the lock.
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "six")
    assert subprocess.run([str(ROOT / "installers/install.sh")], env=env, capture_output=True).returncode == 0
    assert installed(python) == locked("build", "product")
