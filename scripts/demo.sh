#!/usr/bin/env bash
# Set up the host and kata-py's virtual environment (setup-host.sh), build the guest, start a private
# containerd with kata-py, run a container in a VM; everything from the venv's python. Arguments: the
# command to run in the container. Needs root: re-runs itself through sudo otherwise.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
kata_py_as_root "$(readlink -f "$0")" "$@"
cd "$KATA_PY_REPO"

bash scripts/setup-host.sh
echo "[demo] guest image: $("$VENV_PYTHON" packaging/guest/build_guest.py --print-dir)"
exec "$VENV_PYTHON" scripts/demo.py "$@"
