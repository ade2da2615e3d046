#!/usr/bin/env bash
# OPT-1.3b actor + OPT-350m reward model on one GPU with 24 GB.
# Estimated peak memory, steps 1 / 2 / 3: GPU 8.3 / 9.6 / 12.3 GB, CPU RAM 15.8 / 0.0 / 19.8 GB (the arithmetic: docs/operations.md).
#     bash launch/opt/1.3b/single_gpu.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 1.3b rows of launch/opt/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 1.3b single_gpu "$@"
