#!/usr/bin/env bash
# Llama-2-7b actor + Llama-2-7b reward model on one node with 8 GPUs of 80 GB (NUM_GPUS=n for another count; per-GPU batch sizes stay).
#     bash launch/llama2/7b/single_node.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 7b rows of launch/llama2/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 7b single_node "$@"
