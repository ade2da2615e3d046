#!/usr/bin/env bash
# Rewrite constraints.txt from the environment the suite just passed in (default .venv; honours $VENV).
# torch and the packages only torch needs stay out: setup keeps a torch that is already installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${VENV:-$ROOT/.venv}/bin/python"
{
    sed -n '/^#/p' "$ROOT/constraints.txt"
    "$PY" -m pip freeze --all --exclude-editable --disable-pip-version-check \
        | grep -v '^#' | grep -viE '^(pip|torch|sympy|mpmath|networkx|triton|nvidia-[a-z0-9-]*)==' \
        | sort -f
} >"$ROOT/constraints.txt.new"
mv "$ROOT/constraints.txt.new" "$ROOT/constraints.txt"
echo "[lock] wrote $ROOT/constraints.txt ($(grep -vc '^#' "$ROOT/constraints.txt") pins)"
