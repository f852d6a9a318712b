#!/usr/bin/env bash
# Create the virtual environment and install the project into it with the locked versions
# (requirements/lock.txt), once per change of setup.py, this script or the lock. Sourced by main.sh and test.sh.
#
# torch: a machine whose python3 already has torch (a GPU machine) keeps it: the venv sees the system
# site-packages, and every package that the system already has is left as it is (its torch, triton and
# CUDA stack above all); the lock pins only what gets installed. Otherwise the CPU build of the locked torch
# (a file on the CPU machines) is installed first, so pip never picks a multi-GB CUDA build to satisfy the
# "torch" requirement of this package or of DeepSpeed.
#
# MOE_LATEST=1 (set by `scripts/test.sh --latest`) ignores the lock and builds .venv-latest afresh from the
# newest releases (torch excepted: the CPU build stays the locked one). scripts/lock.sh turns a passing
# .venv-latest into the new lock.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
LOCK=requirements/lock.txt
# The CPU build of torch on the CPU machines' disk; newer releases on PyPI are CUDA builds of several GB.
TORCH_VERSION=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$LOCK" 2>/dev/null)
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ "${MOE_LATEST:-0}" = 1 ]; then
  VENV=${MOE_VENV:-.venv-latest}
  rm -rf "$VENV"   # always a fresh resolution
else
  VENV=${MOE_VENV:-.venv}
fi

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c 'import torch' >/dev/null 2>&1; then
    echo "setup: using this machine's torch $("$PY" -c 'import torch; print(torch.__version__)')" >&2
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi

stamp="$VENV/.installed-$(cat setup.py scripts/setup_env.sh "$LOCK" 2>/dev/null | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log="$VENV/install.log"
  echo "setup: installing into $VENV (first run only; pip's log: $log)" >&2
  pip_install() { "$VENV/bin/python" -m pip install -q "$@" >>"$log" 2>&1 || { cat "$log" >&2; exit 1; }; }
  constraints="$VENV/constraints.txt"
  if [ "${MOE_LATEST:-0}" = 1 ]; then
    echo "torch==$TORCH_VERSION" >"$constraints"
  else
    # The lock, less whatever the base interpreter already provides (a GPU machine's own stack).
    "$PY" - "$LOCK" "$constraints" <<'PY'
import re, sys
from importlib import metadata
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
lock, out = sys.argv[1:]
with open(lock) as f, open(out, "w") as g:
    for line in f:
        name = re.split(r"[=<>!~; ]", line.strip(), maxsplit=1)[0]
        if line.strip() and not line.startswith("#") and norm(name) not in have:
            g.write(line)
PY
  fi
  pip_install -c "$constraints" --upgrade pip setuptools
  if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
    pip_install -c "$constraints" "torch==${TORCH_VERSION}"
  fi
  pip_install -c "$constraints" --build-constraint "$constraints" -e ".[test]"
  "$VENV/bin/python" -c 'import torch, deepspeed, triton, transformers, datasets, tokenizers, safetensors, yaml, moe.cli' \
    || { echo "setup: the install into $VENV is incomplete (see $log)" >&2; exit 1; }
  if [ "${MOE_LATEST:-0}" != 1 ]; then
    # Exactly the locked versions, or say which differ.
    "$VENV/bin/python" - "$constraints" <<'PY' || exit 1
import re, sys
from importlib import metadata
bad = []
for line in open(sys.argv[1]):
    m = re.match(r"([A-Za-z0-9_.\-]+)==([^ ;]+)", line.strip())
    if m:
        try:
            got = metadata.version(m[1])
        except metadata.PackageNotFoundError:
            continue  # a platform- or extra-specific pin this machine does not need
        if got.split("+")[0] != m[2].split("+")[0]:
            bad.append(f"{m[1]} {got} (locked {m[2]})")
if bad:
    sys.exit("setup: installed versions differ from requirements/lock.txt: " + ", ".join(bad))
PY
  fi
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
