#!/usr/bin/env bash
# The main job: the minilm_topics recipe at 8 examples per class, seed 0: the real all-MiniLM-L6-v2 (shipped in
# a PyPI package) adapted with topo adapters, against head-only training and LoRA at the same trainable budget,
# on the chatterbot topics. Prints the side-by-side table, saves the adapted model in Hub format with its model
# card under outputs/minilm_topics/ and prints how to push it. Arguments replace these defaults
# (see `python -m recipes.minilm_topics --help`). Sets up .venv on first use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/ensure_env.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg
cd "$root"
if [ "$#" -eq 0 ]; then
  set -- --per-class 8 --seeds 0 --methods head lora topo --save-dir outputs/minilm_topics \
    --output-dir outputs/minilm_topics
fi
exec "$root/.venv/bin/python" -m recipes.minilm_topics "$@"
