#!/usr/bin/env bash
# Sets up everything on a fresh machine (Python, pip and a C++ compiler are enough):
# a virtual environment in .venv; the package with every backend (TensorFlow, JAX,
# PyTorch), KerasCV, KerasHub and its test, demo, export and CUDA-build extras; and the
# compiled SAPA kernels where a compiler exists (custom_ops/build.py, every target).
# Idempotent: a second run re-checks the installs and skips the build when its inputs
# are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# PyTorch's CPU build, pinned: an unpinned `torch` resolves to a CUDA build of several GB.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e \
    ".[tensorflow,jax,torch,keras-cv,keras-hub,export,cuda-build,test,demo]"
if [ -f custom_ops/build.py ]; then
    # One build for every target (TensorFlow op library, JAX/PyTorch bindings, CUDA
    # images, launcher). Never fatal: without the libraries the package falls back to
    # its pure paths.
    .venv/bin/python custom_ops/build.py || echo "setup_env: custom op build failed; the pure paths will be used" >&2
fi
