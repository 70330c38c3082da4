#!/usr/bin/env bash
# Sets up everything on a fresh machine (Python, pip and a C++ compiler are enough):
# a virtual environment in .venv, the package with its test and demo extras, and the
# compiled SAPA custom op where a compiler (and, for the GPU library, nvcc) exists.
# Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test,demo]"
if [ -f custom_ops/build.py ]; then
    # Never fatal: without the library the package falls back to pure TensorFlow.
    .venv/bin/python custom_ops/build.py || echo "setup_env: custom op build failed; the pure TensorFlow path will be used" >&2
fi
