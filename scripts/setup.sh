#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install what is missing.
#
# - A torch that the base interpreter already has (a GPU user's CUDA build) is kept: the venv then sees
#   the base site-packages. With no torch anywhere, the CPU build is installed ($TORCH_SPEC, default
#   torch==2.13.0, which these machines resolve to a local CPU wheel).
# - DeepSpeed ships as a source package that imports torch while building, so everything is installed
#   without build isolation (an isolated build would download a second, CUDA, torch).
# - A stamp of requirements.txt + pyproject.toml makes a second run instant.
# Usage: source scripts/setup.sh   (or bash scripts/setup.sh); honours $PYTHON and $VENV.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
BASE_PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    if "$BASE_PY" -c "import torch" >/dev/null 2>&1; then
        echo "[setup] keeping the torch already installed for $BASE_PY ($("$BASE_PY" -c 'import torch; print(torch.__version__)'))"
        "$BASE_PY" -m venv --system-site-packages "$VENV"
    else
        "$BASE_PY" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
stamp="$VENV/.rlhf-setup-stamp"
want="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "[setup] installing $TORCH_SPEC"
        pip_install "$TORCH_SPEC"
    fi
    echo "[setup] installing requirements into $VENV"
    pip_install setuptools wheel
    pip_install --no-build-isolation -r "$ROOT/requirements.txt" pytest ruff
    pip_install --no-build-isolation --no-deps -e "$ROOT"
    "$PY" -c "import torch, deepspeed, transformers, peft, datasets, common" \
        || { echo "[setup] installation incomplete" >&2; exit 1; }
    echo "$want" >"$stamp"
fi
export PATH="$VENV/bin:$PATH"
