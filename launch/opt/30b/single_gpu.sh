#!/usr/bin/env bash
# OPT-30b actor + OPT-350m reward model on one GPU with 24 GB.
# Estimated peak memory, steps 1 / 2 / 3: GPU 2.1 / 2.3 / 5.6 GB, CPU RAM 72.6 / 4.0 / 136.5 GB (the arithmetic: docs/operations.md).
#     bash launch/opt/30b/single_gpu.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 30b rows of launch/opt/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 30b single_gpu "$@"
