#!/usr/bin/env bash
# The whole pipeline on the built-in tiny default, from a fresh clone, on CPU (or a GPU when present):
#   tiny model + tokenizer -> stage 1 SFT -> stage 2 reward model -> stage 3 PPO -> summary table.
# Usage: bash scripts/demo.sh [OUTPUT_DIR]   (default: output/demo-<timestamp>; an existing directory is refused)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
OUT="${1:-output/demo-$(date +%Y%m%d-%H%M%S)}"
if [ -e "$OUT" ]; then echo "refusing to write into existing $OUT; pass a new directory" >&2; exit 1; fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SEED=1234
COMMON=(--data_output_path "$OUT/data_cache" --seed "$SEED" --enable_tensorboard)
stage() { local name=$1; shift; local t0=$SECONDS; echo "== $name"; "$@" 2>&1 | tee "$OUT/$name.log" | grep -E "^\[(sft|reward|ppo|data)\]"; echo "$name $((SECONDS - t0))" >>"$OUT/stage_seconds.txt"; }

stage tiny python -m common.tiny "$OUT/tiny" --arch opt --seed 0
stage step1_sft python step1_sft/main.py --model_name_or_path "$OUT/tiny" --output_dir "$OUT/sft" \
    --tensorboard_path "$OUT/tensorboard/sft" "${COMMON[@]}" \
    --per_device_train_batch_size 16 --learning_rate 2e-3 --num_train_epochs 3 --max_seq_len 128 --num_warmup_steps 5
stage step2_reward python step2_reward/main.py --model_name_or_path "$OUT/sft" --output_dir "$OUT/rm" \
    --tensorboard_path "$OUT/tensorboard/rm" "${COMMON[@]}" \
    --per_device_train_batch_size 16 --learning_rate 2e-3 --num_train_epochs 1 --max_seq_len 128 \
    --eval_interval 25 --normalization_policy_path "$OUT/sft" --normalization_num_samples 256 \
    --normalization_max_new_tokens 48
stage step3_rlhf python step3_rlhf/main.py --actor_model_name_or_path "$OUT/sft" --critic_model_name_or_path "$OUT/rm" \
    --output_dir "$OUT/ppo" --tensorboard_path "$OUT/tensorboard/ppo" "${COMMON[@]}" \
    --per_device_generation_batch_size 16 --per_device_training_batch_size 8 --max_prompt_seq_len 64 \
    --max_answer_seq_len 48 --enable_test_mode --test_stop_step 30 --eval_num_prompts 128 \
    --actor_learning_rate 2e-4 --critic_learning_rate 5e-4 --lr_scheduler_type constant
python scripts/summarize.py "$OUT"
