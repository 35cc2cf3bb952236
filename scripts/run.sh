#!/usr/bin/env bash
# The main job: ranks every position of the real all-MiniLM-L6-v2 (shipped in a PyPI package) by the
# topological derivative of the loss on an embedded 4-topic English set, prints the table and writes
# outputs/score/{scores.json,scores.md,scores.png}. Any argument goes to `hf-topoadapt score`
# (try --help). Sets up .venv on first use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/ensure_env.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
cd "$root"
exec "$root/.venv/bin/python" -m hf_topoadapt score "$@"
