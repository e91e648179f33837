#!/usr/bin/env bash
# Installs llmtap from this checkout: a venv in /opt/llmtap and the command /usr/local/bin/llmtap.
#   sudo scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run it as root (sudo scripts/install.sh)" >&2
  exit 2
fi
prefix=${LLMTAP_PREFIX:-/opt/llmtap}
if command -v apt-get >/dev/null && ! command -v nft >/dev/null && ! command -v iptables >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nftables >/dev/null
fi
python=$(scripts/find-python.sh)
[ -x "$prefix/bin/python" ] || "$python" -m venv "$prefix"
"$prefix/bin/pip" install -q --disable-pip-version-check .
ln -sf "$prefix/bin/llmtap" /usr/local/bin/llmtap
echo "installed: $(/usr/local/bin/llmtap --version) -> /usr/local/bin/llmtap (next: sudo llmtap install)"
