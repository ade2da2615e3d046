#!/usr/bin/env bash
# Qwen2.5-7B actor + Qwen2.5-0.5B reward model on one node with 8 GPUs of 80 GB (NUM_GPUS=n for another count; per-GPU batch sizes stay).
#     bash launch/qwen2.5/7b/single_node.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 7b rows of launch/qwen2.5/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 7b single_node "$@"
