# Sourced by setup-host.sh, test.sh and demo.sh (bash): root, and the virtual environment kata-py runs in.
#
#   KATA_PY_VENV      the venv (default <repo>/.venv, gitignored); no system site-packages
#   PYTHON            the interpreter the venv is made from (default python3: Debian's 3.11 on bookworm)
#   KATA_PY_FRESH_VENV=1   make the venv anew (CI does); otherwise an existing one is upgraded in place

KATA_PY_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KATA_PY_VENV=${KATA_PY_VENV:-$KATA_PY_REPO/.venv}
VENV_PYTHON=$KATA_PY_VENV/bin/python

# What a sudo re-run keeps of the caller's environment: our own settings, pip's (index, proxy), proxies.
_kata_py_kept_env() {
  compgen -e | grep -E '^(KATA_PY_[A-Z0-9_]+|PIP_[A-Z0-9_]+|PYTHON|[Hh][Tt][Tt][Pp][Ss]?_[Pp][Rr][Oo][Xx][Yy]|[Nn][Oo]_[Pp][Rr][Oo][Xx][Yy])$' \
    | paste -sd, - || true
}

# kata_py_as_root SCRIPT ARGS...: return if we are root; else run SCRIPT again through sudo (never returns).
# containerd, mounts, netns, cgroups and QEMU's devices need root.
kata_py_as_root() {
  local script=$1
  shift
  [ "$(id -u)" -eq 0 ] && return 0
  if ! command -v sudo >/dev/null 2>&1; then
    echo "[kata-py] $(basename "$script") needs root: run it from a root shell (sudo is not installed)" >&2
    exit 1
  fi
  local keep
  keep=$(_kata_py_kept_env)
  echo "[kata-py] not root: running $(basename "$script") through sudo" >&2
  exec sudo ${keep:+--preserve-env="$keep"} -- bash "$script" "$@"
}
