#!/usr/bin/env bash
# Qwen2.5-1.5B actor + Qwen2.5-0.5B reward model on several nodes of 8 GPUs of 80 GB listed in a DeepSpeed hostfile (HOSTFILE, default /job/hostfile).
#     bash launch/qwen2.5/1.5b/multi_node.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 1.5b rows of launch/qwen2.5/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 1.5b multi_node "$@"
