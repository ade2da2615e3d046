#!/usr/bin/env bash
# Llama-2-13b actor + Llama-2-7b reward model on several nodes of 8 GPUs of 80 GB listed in a DeepSpeed hostfile (HOSTFILE, default /job/hostfile).
#     bash launch/llama2/13b/multi_node.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 13b rows of launch/llama2/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 13b multi_node "$@"
