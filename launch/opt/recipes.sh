#!/usr/bin/env bash
# OPT recipes: actor facebook/opt-<size>, reward model facebook/opt-350m, fp16, LoRA on 'decoder.layers.'.
# One row per model size and deployment; the columns are the arguments of `recipe` (launch/lib.sh), which
# turns them into the stages' flags. multi_node uses the single_node row (only the launcher differs).
# Sourced by launch/opt/<size>/<deployment>.sh as:  source recipes.sh SIZE DEPLOYMENT "$@"
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" "$@"  # sets SIZE and DEPLOYMENT from the first two

ACTOR_MODEL="${ACTOR_MODEL:-facebook/opt-$SIZE}"
REWARD_MODEL="${REWARD_MODEL:-facebook/opt-350m}"
DTYPE=fp16 LORA_MODULE=decoder.layers. RM_LR=5e-5

# columns: SFT zero batch accumulation | RM zero batch accumulation | PPO actor-zero critic-zero
#          generation-batch training-batch accumulation | options (batches per GPU; options: launch/lib.sh)
case "$SIZE/${DEPLOYMENT/multi_node/single_node}" in
    1.3b/single_gpu)     recipe 2  8  8   2  8  8   2 2  8  4  2   sft_offload ppo_offload ;;
    6.7b/single_gpu)     recipe 2  4 16   2  8  8   2 2  4  2  2   sft_offload sft_lora rm_offload ppo_offload offload_ref actor_lora ;;
    13b/single_gpu)      recipe 3  2 32   2  8  8   3 2  2  1  2   sft_offload sft_lora rm_offload rm_chosen ppo_offload offload_ref actor_lora ;;
    30b/single_gpu)      recipe 3  1 64   2  8  8   3 2  1  1  1   sft_offload sft_lora rm_offload rm_chosen ppo_offload offload_ref actor_lora ;;
    66b/single_gpu)      recipe 3  1 64   2  8  8   3 2  1  1  1   sft_offload sft_lora rm_offload rm_chosen ppo_offload offload_ref actor_lora ;;
    1.3b/single_node)    recipe 2  8  1   2  8  1   2 2  4  4  1   hybrid ;;
    6.7b/single_node)    recipe 3  8  1   2  8  1   3 2  4  4  1   hybrid ;;
    13b/single_node)     recipe 3  4  2   2  8  1   3 2  4  4  1   hybrid ;;
    30b/single_node)     recipe 3  4  2   2  8  1   3 2  4  4  1   sft_lora rm_chosen actor_lora hybrid ;;
    66b/single_node)     recipe 3  2  4   2  8  1   3 2  2  2  1   sft_lora rm_chosen offload_ref actor_lora hybrid ;;
    *) echo "launch: no OPT recipe for $SIZE on $DEPLOYMENT in $0" >&2; exit 2 ;;
esac
launch
