#!/usr/bin/env bash
# Sets up everything Jin needs on a fresh machine, idempotently: system packages, a virtual
# environment in .venv with PyTorch (the CPU build where there is no CUDA), the five packages
# (editable, with their test extras) and the developer tools (nox, ruff, build).
# A second run only checks what is there. Environment: PYTHON (default python3), JIN_TORCH_SPEC and
# JIN_TORCH_INDEX_URL (see scripts/install_torch.py).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: Jin needs Python >= 3.11; '$PYTHON' is $("$PYTHON" --version 2>&1 || echo missing)." >&2
  echo "setup: set PYTHON=/path/to/python3.11 and run again." >&2
  exit 1
fi

# espeak-ng speaks the numbers of the NumberWorld corpus (packages/jin-data).
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing espeak-ng with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null
  else
    echo "setup: espeak-ng is missing and cannot be installed here (needs root and apt-get)." >&2
    echo "setup: install it yourself, e.g. 'sudo apt-get install espeak-ng' (Debian/Ubuntu)" >&2
    echo "setup: or 'brew install espeak-ng' (macOS), then run this again." >&2
    exit 1
  fi
fi

# Also when .venv has no pip: a first `venv` that failed in ensurepip (Debian and Ubuntu without
# python3-venv) leaves .venv/bin/python behind; run on the existing .venv, venv adds pip.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" scripts/install_torch.py
echo "setup: installing the five packages (editable) and nox, ruff, build"
"$VPY" -m pip install --quiet \
  -e "packages/jin-encoders[test]" \
  -e "packages/jin-backbone[test]" \
  -e "packages/jin-zjepa[test]" \
  -e "packages/jin-data[test]" \
  -e "packages/jin-orchestrate[test]" \
  "nox>=2024.10" "ruff>=0.6" "build>=1.2"
echo "setup: done ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
