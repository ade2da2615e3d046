#!/usr/bin/env bash
# OPT-6.7b actor + OPT-350m reward model on one node with 8 GPUs of 80 GB (NUM_GPUS=n for another count; per-GPU batch sizes stay).
#     bash launch/opt/6.7b/single_node.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 6.7b rows of launch/opt/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 6.7b single_node "$@"
