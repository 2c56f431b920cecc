#!/usr/bin/env bash
# Set up the host, build the guest, start a private containerd with kata-py, run a container in a VM.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

bash scripts/setup-host.sh
echo "[demo] guest image: $($PYTHON packaging/guest/build_guest.py --print-dir)"
exec $PYTHON scripts/demo.py "$@"
