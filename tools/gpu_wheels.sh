#!/usr/bin/env bash
# Download here (where pip reaches PyPI) the wheels tools/gpu_check.sh installs on a GPU machine that has no network:
# Python 3.12 x86-64, the packages its image lacks (DeepSpeed and datasets, and what they need beyond the image:
# docs/gpu_check.md lists what the image has). Versions are this checkout's .venv's (what the suite ran), so the GPU
# run uses the same releases. Writes .whl/ (ignored by .gitignore; about 60 MB, pyarrow 55 MB
# of it; the device tool carries up to 64 MiB with the working tree).
#
#   tools/gpu_wheels.sh            then: the device tool's run with carry [".whl"] and command tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-.venv/bin/python}
mkdir -p .whl
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# DeepSpeed publishes source only: build its (pure Python) wheel here, against this venv's torch, ops not prebuilt.
"$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
pkgs=()
for name in datasets dill multiprocess pyarrow fsspec hjson pydantic pydantic-core annotated-types typing-inspection; do
  pkgs+=("$name==$(version "$name")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pkgs[@]}"
ls -la .whl
du -sh .whl
