#!/usr/bin/env bash
# Set up the host and kata-py's virtual environment (setup-host.sh), build (or reuse) the guest image,
# and run the whole test suite, everything from the venv's python. Extra arguments go to pytest.
# Needs root (containerd, mounts, QEMU): re-runs itself through sudo otherwise.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
kata_py_as_root "$(readlink -f "$0")" "$@"
cd "$KATA_PY_REPO"

bash scripts/setup-host.sh
echo "[test] python: $VENV_PYTHON ($("$VENV_PYTHON" --version))"
echo "[test] guest image: $("$VENV_PYTHON" packaging/guest/build_guest.py --print-dir)"
"$VENV_PYTHON" -m protos.generate --check
"$VENV_PYTHON" -m ruff check .
# [tool.mypy] in pyproject.toml: the packages, zero errors. Its cache lives with the venv (a fresh
# venv, as in CI, checks from scratch: a few seconds).
"$VENV_PYTHON" -m mypy --cache-dir "$KATA_PY_VENV/.mypy_cache"
# exit 5 (no tests collected) is a failure here, like any other non-zero exit
exec "$VENV_PYTHON" -m pytest -p no:cacheprovider "$@"
