#!/usr/bin/env bash
# The main job: set up .venv if needed, then pretrain the tiny MoE on the embedded default corpus.
# Extra arguments go to `moe train` (e.g. --max-steps 50, --out runs/x, model.moe.num_experts=4). It writes
# runs/tiny; run again, it refuses to mix runs there: add --resume to continue, --overwrite to start over.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
exec .venv/bin/moe train recipes/tiny.yaml "$@"
