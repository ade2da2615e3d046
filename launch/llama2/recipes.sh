#!/usr/bin/env bash
# Llama-2 recipes: actor meta-llama/Llama-2-<size>-hf, reward model meta-llama/Llama-2-7b-hf, bf16, LoRA on 'layers.'.
# One row per model size and deployment; the columns are the arguments of `recipe` (launch/lib.sh), which
# turns them into the stages' flags. multi_node uses the single_node row (only the launcher differs).
# Sourced by launch/llama2/<size>/<deployment>.sh as:  source recipes.sh SIZE DEPLOYMENT "$@"
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" "$@"  # sets SIZE and DEPLOYMENT from the first two

ACTOR_MODEL="${ACTOR_MODEL:-meta-llama/Llama-2-$SIZE-hf}"
REWARD_MODEL="${REWARD_MODEL:-meta-llama/Llama-2-7b-hf}"
DTYPE=bf16 LORA_MODULE=layers. RM_LR=9.65e-6

# columns: SFT zero batch accumulation | RM zero batch accumulation | PPO actor-zero critic-zero
#          generation-batch training-batch accumulation | options (batches per GPU; options: launch/lib.sh)
case "$SIZE/${DEPLOYMENT/multi_node/single_node}" in
    7b/single_gpu)       recipe 2  4 16   3  2 32   2 3  2  1  2   sft_offload sft_lora rm_offload rm_lora ppo_offload offload_ref offload_reward actor_lora critic_lora ;;
    13b/single_gpu)      recipe 3  2 32   3  2 32   3 3  1  1  1   sft_offload sft_lora rm_offload rm_lora rm_chosen ppo_offload offload_ref offload_reward actor_lora critic_lora ;;
    70b/single_gpu)      recipe 3  1 64   3  2 32   3 3  1  1  1   sft_offload sft_lora rm_offload rm_lora rm_chosen ppo_offload offload_ref offload_reward actor_lora critic_lora ;;
    7b/single_node)      recipe 3  4  2   3  4  2   3 3  4  4  1   offload_ref ;;
    13b/single_node)     recipe 3  4  2   3  4  2   3 3  2  2  1   offload_ref ;;
    70b/single_node)     recipe 3  2  4   3  4  2   3 3  2  2  1   sft_lora rm_chosen offload_ref offload_reward actor_lora ;;
    *) echo "launch: no Llama-2 recipe for $SIZE on $DEPLOYMENT in $0" >&2; exit 2 ;;
esac
launch
