#!/usr/bin/env bash
# Create .venv and install the project into it, once per change of setup.py. Sourced by main.sh and test.sh.
#
# torch: a machine whose python3 already has torch (a GPU machine) keeps it (the venv sees the system
# site-packages); otherwise the CPU build torch==2.13.0 is installed first, so that pip never picks a
# multi-GB CUDA build to satisfy the "torch" requirement of this package or of DeepSpeed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
TORCH_CPU_VERSION=2.13.0

if [ ! -x .venv/bin/python ]; then
  if "$PY" -c 'import torch' >/dev/null 2>&1; then
    echo "setup: using this machine's torch $("$PY" -c 'import torch; print(torch.__version__)')" >&2
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi

stamp=".venv/.installed-$(cat setup.py scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing into .venv (first run only; pip's log: .venv/install.log)" >&2
  log=.venv/install.log
  pip_install() { .venv/bin/python -m pip install -q "$@" >>"$log" 2>&1 || { cat "$log" >&2; exit 1; }; }
  pip_install --upgrade pip
  if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
    pip_install "torch==${TORCH_CPU_VERSION}"
  fi
  pip_install -e ".[test]"
  .venv/bin/python -c 'import torch, deepspeed, triton, transformers, datasets, tokenizers, safetensors, yaml, moe' \
    || { echo "setup: the install into .venv is incomplete (see .venv/install.log)" >&2; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
fi
