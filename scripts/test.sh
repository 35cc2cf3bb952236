#!/usr/bin/env bash
# Lint and test: ruff check, then pytest (extra arguments go to pytest). Sets up .venv on first use.
# Exits non-zero when either fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/ensure_env.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg
cd "$root"
status=0
echo "== ruff check" >&2
"$root/.venv/bin/ruff" check . || status=1
echo "== pytest" >&2
"$root/.venv/bin/python" -m pytest -q "$@" || status=$?
exit "$status"
