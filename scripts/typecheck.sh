#!/usr/bin/env bash
# mypy cannot follow setuptools' editable mapping (daemon/ -> llmtap, platform/ -> llmtap.platform),
# so it checks a copy laid out as the installed package is.
set -euo pipefail
cd "$(dirname "$0")/.."
mypy=${1:-mypy}
[[ "$mypy" == */* ]] && mypy=$(realpath "$mypy")
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
cp -r daemon "$tree/llmtap"
cp -r platform "$tree/llmtap/platform"
cp pyproject.toml "$tree/"
(cd "$tree" && "$mypy" --config-file pyproject.toml -p llmtap) 2>&1 | sed "s#$tree/##g"
exit "${PIPESTATUS[0]}"
