#!/usr/bin/env bash
# Qwen2.5 recipes: actor Qwen/Qwen2.5-<SIZE>, reward model Qwen/Qwen2.5-0.5B, bf16, LoRA on 'layers.'.
# One row per model size and deployment; the columns are the arguments of `recipe` (launch/lib.sh), which
# turns them into the stages' flags. multi_node uses the single_node row (only the launcher differs).
# Sourced by launch/qwen2.5/<size>/<deployment>.sh as:  source recipes.sh SIZE DEPLOYMENT "$@"
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" "$@"  # sets SIZE and DEPLOYMENT from the first two

ACTOR_MODEL="${ACTOR_MODEL:-Qwen/Qwen2.5-${SIZE^^}}"
REWARD_MODEL="${REWARD_MODEL:-Qwen/Qwen2.5-0.5B}"
DTYPE=bf16 LORA_MODULE=layers. RM_LR=5e-5

# columns: SFT zero batch accumulation | RM zero batch accumulation | PPO actor-zero critic-zero
#          generation-batch training-batch accumulation | options (batches per GPU; options: launch/lib.sh)
case "$SIZE/${DEPLOYMENT/multi_node/single_node}" in
    0.5b/single_gpu)     recipe 2  4 16   2  4 16   2 2  4  4  1   ppo_offload ;;
    1.5b/single_gpu)     recipe 2  4 16   2  4 16   2 2  4  2  2   sft_offload ppo_offload ;;
    7b/single_gpu)       recipe 2  2 32   2  4 16   2 2  2  1  2   sft_offload sft_lora rm_offload ppo_offload offload_ref offload_reward actor_lora critic_lora ;;
    0.5b/single_node)    recipe 2  8  1   2  8  1   2 2  8  4  2    ;;
    1.5b/single_node)    recipe 2  8  1   2  8  1   2 2  8  4  2    ;;
    7b/single_node)      recipe 3  4  2   2  8  1   3 2  4  4  1    ;;
    *) echo "launch: no Qwen2.5 recipe for $SIZE on $DEPLOYMENT in $0" >&2; exit 2 ;;
esac
launch
