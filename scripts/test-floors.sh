#!/usr/bin/env bash
# The declared dependency floors, tested: a fresh venv (default /tmp/kata-py-floors) with every
# dependency of pyproject.toml (and its test extra) pinned to its floor (`>=X` becomes `==X`), then the
# fast suite (no VM, no containerd, no Go) and ruff from it. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
kata_py_as_root "$(readlink -f "$0")" "$@"
cd "$KATA_PY_REPO"

FLOORS_VENV=${KATA_PY_FLOORS_VENV:-/tmp/kata-py-floors}
BASE_PYTHON=${PYTHON:-python3}
mapfile -t pins < <("$BASE_PYTHON" - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    name, op, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(>=|==)\s*([0-9][^,;\s]*)", req).groups()
    print(f"{name}=={version}")
PY
)
rm -rf "$FLOORS_VENV"
"$BASE_PYTHON" -m venv "$FLOORS_VENV"
echo "[floors] pip install ${pins[*]}"
"$FLOORS_VENV/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}"
"$FLOORS_VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
"$FLOORS_VENV/bin/python" -m pip check
"$FLOORS_VENV/bin/python" -m ruff check .
exec "$FLOORS_VENV/bin/python" -m pytest -p no:cacheprovider -q -m "not vm and not containerd and not go" \
  tests/unit tests/component "$@"
