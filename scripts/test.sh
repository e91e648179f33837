#!/usr/bin/env bash
# The README's test command. On a fresh machine, as root: installs the system packages and the
# Python environment, then runs the linters and the whole suite (end-to-end tests included).
#   sudo scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(nftables iptables curl iproute2 procps passwd tmux ca-certificates nodejs libnss3-tools openssl
          ca-certificates-java
          systemd openssh-server
          chromium fonts-dejavu-core  # the web UI's browser tests (headless, over DevTools)
          prometheus clickhouse-server)  # the team view's real stores (tests/e2e/test_team_e2e.py)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

scripts/venv-from-lock.sh .venv test --editable  # the locked product and test tools
# The real CLIs the end-to-end tests drive, pinned with their hashes in tests/clis/package-lock.json.
(cd tests/clis && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
.venv/bin/uv lock --check --quiet   # uv.lock still matches pyproject.toml (scripts/lock.sh mends it)
.venv/bin/deptry .                  # every import declared, every dependency used

.venv/bin/ruff check .
scripts/typecheck.sh .venv/bin/mypy
[ $# -eq 0 ] || exec .venv/bin/pytest "$@"
# The whole suite: on two workers, a file per worker at a time (a module's daemon is started once), as
# the end-to-end tests mostly wait on sockets and processes; then, alone, the few that keep both cores
# busy (a worker starved for 2 s counts as hung and is healed, which would disturb the other tests).
status=0
.venv/bin/pytest -n 2 --dist loadfile -m "not serial" || status=$?
.venv/bin/pytest -m serial || status=$?
exit "$status"
