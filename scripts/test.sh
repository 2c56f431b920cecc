#!/usr/bin/env bash
# Set up the host, build (or reuse) the guest image, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

bash scripts/setup-host.sh
echo "[test] guest image: $($PYTHON packaging/guest/build_guest.py --print-dir)"
$PYTHON -m protos.generate --check
$PYTHON -m ruff check .
# exit 5 (no tests collected) is a failure here, like any other non-zero exit
exec $PYTHON -m pytest -p no:cacheprovider "$@"
