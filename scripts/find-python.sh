#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 (mitmproxy 12 needs it), preferring 3.12, the version the
# project is tested on: one on PATH that really runs, else one installed by pyenv (whose shims
# may refuse to run it).
set -euo pipefail
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }
for candidate in python3.12 python3 python3.13 python3.14; do
  path=$(command -v "$candidate" 2>/dev/null) || continue
  if ok "$path"; then echo "$path"; exit 0; fi
done
home=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$home/.pyenv}")
for path in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3.1[2-9] 2>/dev/null | sort -V); do
  if ok "$path"; then echo "$path"; exit 0; fi
done
echo "find-python: no Python >= 3.12 found (install python3.12, or one with pyenv)" >&2
exit 1
