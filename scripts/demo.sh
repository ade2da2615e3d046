#!/usr/bin/env bash
# The README's main command: set up .venv, then the whole pipeline on the built-in tiny default, from a fresh
# clone, on the CPU (or a GPU when present): tiny model + tokenizer -> stage 1 SFT -> stage 2 reward model ->
# stage 3 PPO -> summary table, PPO curves (PNG) and TensorBoard logs. It is `python e2e_rlhf.py --tiny`.
# Usage: bash scripts/demo.sh [OUTPUT_DIR] [e2e_rlhf.py flags, e.g. --force or --step 3]
#   OUTPUT_DIR defaults to output/demo-<timestamp>; in an existing one, finished stages are skipped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
# DEMO_NAME / DEMO_MODEL: another model's demo (scripts/demo_smollm2.sh) in place of the tiny default.
OUT="output/${DEMO_NAME:-demo}-$(date +%Y%m%d-%H%M%S)"
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then OUT="$1"; shift; fi
read -r -a model <<<"${DEMO_MODEL:---tiny}"
exec python e2e_rlhf.py "${model[@]}" --output-dir "$OUT" "$@"
