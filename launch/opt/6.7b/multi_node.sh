#!/usr/bin/env bash
# OPT-6.7b actor + OPT-350m reward model on several nodes of 8 GPUs of 80 GB listed in a DeepSpeed hostfile (HOSTFILE, default /job/hostfile).
#     bash launch/opt/6.7b/multi_node.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 6.7b rows of launch/opt/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 6.7b multi_node "$@"
