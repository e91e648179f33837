#!/usr/bin/env bash
# Installs llmtap from this checkout: a venv in /opt/llmtap holding the locked versions
# (requirements/product.txt) and the command /usr/local/bin/llmtap.
#   sudo installers/install.sh      (LLMTAP_PREFIX and LLMTAP_BIN_DIR move the venv and the command)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run it as root (sudo installers/install.sh)" >&2
  exit 2
fi
prefix=${LLMTAP_PREFIX:-/opt/llmtap}
bin_dir=${LLMTAP_BIN_DIR:-/usr/local/bin}
if command -v apt-get >/dev/null && ! command -v nft >/dev/null && ! command -v iptables >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nftables >/dev/null
fi
scripts/venv-from-lock.sh "$prefix" product  # exactly the versions in requirements/product.txt
ln -sf "$prefix/bin/llmtap" "$bin_dir/llmtap"
echo "installed: $("$bin_dir/llmtap" --version) -> $bin_dir/llmtap (next: sudo llmtap install)"
