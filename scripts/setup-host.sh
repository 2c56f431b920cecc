#!/usr/bin/env bash
# Install what kata-py needs on a Debian bookworm host (run as root), then kata-py itself.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 containerd runc crun busybox-static debootstrap kmod cpio xz-utils zstd
  erofs-utils e2fsprogs file util-linux iproute2 containernetworking-plugins
  golang-go golang-github-containerd-ttrpc-dev golang-github-gogo-protobuf-dev
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
echo "[setup] pip install -e .[test] ($($PYTHON --version))"
$PYTHON -m pip install -q --disable-pip-version-check -e '.[test]'
