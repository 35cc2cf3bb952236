#!/usr/bin/env bash
# Creates .venv from the pinned versions when it is missing (or when the pins changed), then returns.
# torch and torchvision go in first, alone: torchvision from the registry only imports beside the
# torch build it was made for, and a later resolve must not swap torch (see ENVIRONMENT.md).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.pins.sha"
pins_sha="$(cat "$root/requirements/constraints.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins_sha" ]; then
  exit 0
fi
echo "[hf_topoadapt] creating $venv from requirements/constraints.txt (a few minutes, once)" >&2
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
torch_pin="$(grep -E '^torch==' "$root/requirements/constraints.txt")"
tv_pin="$(grep -E '^torchvision==' "$root/requirements/constraints.txt")"
"$venv/bin/python" -m pip install --quiet "$torch_pin" "$tv_pin"
"$venv/bin/python" -m pip install --quiet -c "$root/requirements/constraints.txt" -e "$root[timm,real-models,dev]"
echo "$pins_sha" > "$stamp"
