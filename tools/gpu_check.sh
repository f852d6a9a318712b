#!/usr/bin/env bash
# One-shot device check (issue 15): on a bare one-GPU machine (Python 3.12, torch 2.11, Triton 3.6, no DeepSpeed, no
# datasets, no network) install the carried wheels, then run tools/gpu_check.py's steps within 8 minutes:
# pytest -m gpu, every backend vs the reference in bf16 at realistic shapes, moe bench layer GPU cases, a bf16
# DeepSpeed training run of recipes/gpu.yaml, then (time allowing) the kernel tests and the Triton tile sweep.
# Writes DIR/gpu_check.json and DIR/gpu_check.log (DIR: --out, else $OUT where the device tool sets it, else
# gpu_check_out). docs/gpu_check.md says how to download the wheels here (tools/gpu_wheels.sh) and run it.
#
#   tools/gpu_check.sh [--dry-run] [--out DIR]
#
# --dry-run: this machine's .venv, no wheels, tiny sizes: proves the wiring on a CPU (tests/tools/test_gpu_check.py).
# Environment: PYTHON (default python3; .venv/bin/python in a dry run), MOE_WHEELS (the wheel folder, default .whl).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dry=0
out=${OUT:-gpu_check_out}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out=${2:?--out needs a folder}; shift ;;
    *) echo "error: unknown argument $1; valid: --dry-run, --out DIR" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
log="$out/gpu_check.log"
: >"$log"
start=$(date +%s)
if [ "$dry" = 1 ]; then
  py=${PYTHON:-.venv/bin/python}
  echo "dry run with $py; wheels in .whl: $(ls .whl/*.whl 2>/dev/null | wc -l) (not installed in a dry run)" | tee -a "$log"
else
  py=${PYTHON:-python3}
  whl=${MOE_WHEELS:-.whl}
  if ! ls "$whl"/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in $whl/: download them first (docs/gpu_check.md: tools/gpu_wheels.sh)" | tee -a "$log" >&2
    exit 2
  fi
  # pyarrow travels for datasets (it needs >= 24) but is installed only where the machine's own is older or missing.
  wheels=$(ls "$whl"/*.whl | grep -v '/pyarrow-')
  if ! "$py" -c 'import pyarrow, sys; sys.exit(int(pyarrow.__version__.split(".")[0]) < 24)' 2>/dev/null; then
    wheels="$wheels $(ls "$whl"/pyarrow-*.whl 2>/dev/null)"
  fi
  # shellcheck disable=SC2086
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    >>"$log" 2>&1 || { echo "error: installing the carried wheels failed (see $log)" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  echo "installed $(echo $wheels | wc -w) wheels into /tmp/site in $(( $(date +%s) - start )) s" | tee -a "$log"
fi
budget=$(( 470 - ($(date +%s) - start) ))
args=(--out "$out" --budget "$budget")
[ "$dry" = 1 ] && args+=(--dry-run)
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$py" -m moe.tools.gpu_check "${args[@]}"
rc=$?
echo "gpu_check.sh: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$log"
exit $rc
