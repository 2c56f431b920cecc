#!/usr/bin/env bash
# Install what kata-py needs on a Debian bookworm host, then kata-py itself into its own virtual
# environment (scripts/lib.sh: <repo>/.venv, no system site-packages) with the newest releases the
# registry serves. Needs root (apt): re-runs itself through sudo otherwise. A second run installs
# nothing new from apt and upgrades the venv in place (KATA_PY_FRESH_VENV=1: makes it anew).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
kata_py_as_root "$(readlink -f "$0")" "$@"
cd "$KATA_PY_REPO"

APT_PACKAGES=(
  qemu-system-x86 containerd runc crun busybox-static debootstrap kmod cpio xz-utils zstd
  erofs-utils e2fsprogs file util-linux iproute2 containernetworking-plugins
  prometheus  # promtool checks our metrics; the metrics e2e test runs a private prometheus
  golang-go golang-github-containerd-ttrpc-dev golang-github-gogo-protobuf-dev
)
BASE_PYTHON=${PYTHON:-python3}
can_make_venv() { command -v "$BASE_PYTHON" >/dev/null 2>&1 && "$BASE_PYTHON" -c 'import ensurepip, venv' 2>/dev/null; }
can_make_venv || APT_PACKAGES+=(python3 python3-venv)  # Debian ships venv's ensurepip apart
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # only its binaries are wanted: the host-wide service Debian starts on a systemd host is not ours
  if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi
if ! can_make_venv; then
  echo "[setup] $BASE_PYTHON cannot make a virtual environment (no venv/ensurepip); set PYTHON=/usr/bin/python3" >&2
  exit 1
fi

venv_ok() {  # a venv of ours that runs, without system site-packages
  [ -x "$VENV_PYTHON" ] && "$VENV_PYTHON" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null &&
    grep -qx 'include-system-site-packages = false' "$KATA_PY_VENV/pyvenv.cfg"
}
if [ "${KATA_PY_FRESH_VENV:-0}" = 1 ] || ! venv_ok; then
  if [ -e "$KATA_PY_VENV" ] && [ ! -f "$KATA_PY_VENV/pyvenv.cfg" ]; then
    echo "[setup] $KATA_PY_VENV exists and is not a virtual environment: not touching it" >&2
    exit 1
  fi
  rm -rf "$KATA_PY_VENV"
  echo "[setup] new virtual environment $KATA_PY_VENV ($("$BASE_PYTHON" --version), no system site-packages)"
  "$BASE_PYTHON" -m venv "$KATA_PY_VENV"
fi
PIP=("$VENV_PYTHON" -m pip install -q --disable-pip-version-check --upgrade --upgrade-strategy eager)
"${PIP[@]}" pip
echo "[setup] pip install --upgrade -e .[test] into $KATA_PY_VENV"
"${PIP[@]}" -e '.[test]'
echo "[setup] $("$VENV_PYTHON" -m pip freeze --disable-pip-version-check --exclude-editable | paste -sd' ' -)"
