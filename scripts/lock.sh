#!/usr/bin/env bash
# Refreshes the lock: uv.lock from pyproject.toml, then the hashed requirement sets that
# installers/install.sh and scripts/test.sh install with plain pip (no uv needed there).
#   scripts/lock.sh              keep every locked version that still fits pyproject.toml
#   scripts/lock.sh --upgrade    take the newest versions pyproject.toml allows
set -euo pipefail
cd "$(dirname "$0")/.."
uv=.venv/bin/uv  # pinned in the test set; run scripts/test.sh once first
[ -x "$uv" ] || { echo "lock.sh: no $uv: run scripts/test.sh first" >&2; exit 2; }
"$uv" lock "$@"
export_set() {  # NAME, then uv export's selection of groups
  local name=$1; shift
  "$uv" export --quiet --frozen --no-emit-project --format requirements-txt "$@" -o "requirements/$name.txt"
}
export_set build --only-group build    # the build backend, for --no-build-isolation
export_set product --no-default-groups # what the daemon runs on
export_set test --no-default-groups --group test  # the product plus the test and lint tools
echo "lock.sh: uv.lock and requirements/{build,product,test}.txt updated; commit them together"
