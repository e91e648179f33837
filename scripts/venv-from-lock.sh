#!/usr/bin/env bash
# Makes VENV hold exactly the locked versions of SET (product or test), then llmtap itself.
#   scripts/venv-from-lock.sh VENV product|test [--editable]
# Every package is checked against the hashes in requirements/SET.txt, and packages the lock does
# not name are removed, so a reused venv equals the lock too. llmtap is built with the locked
# setuptools and no build isolation: nothing unlocked is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$1 set=$2 editable=${3:-}
python=$(scripts/find-python.sh)
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() {  # the machine-wide pip config may name local wheel folders that are absent: not our news
  "$venv/bin/python" -m pip --disable-pip-version-check --quiet "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
locked=(requirements/build.txt "requirements/$set.txt")
pip install --require-hashes --no-deps $(printf -- '-r %s ' "${locked[@]}")
extra=$("$venv/bin/python" - "${locked[@]}" <<'PY'
import re, sys
from importlib.metadata import distributions
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
wanted = {norm(m.group(1)) for f in sys.argv[1:] for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", open(f).read(), re.M)}
keep = wanted | {"pip", "llmtap"}
print(" ".join(sorted({d.metadata["Name"] for d in distributions() if norm(d.metadata["Name"]) not in keep})))
PY
)
[ -z "$extra" ] || pip uninstall -y $extra
pip install --no-deps --no-build-isolation ${editable:+-e} .
