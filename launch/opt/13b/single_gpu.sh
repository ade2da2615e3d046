#!/usr/bin/env bash
# OPT-13b actor + OPT-350m reward model on one GPU with 24 GB.
# Estimated peak memory, steps 1 / 2 / 3: GPU 2.1 / 2.3 / 5.1 GB, CPU RAM 33.3 / 4.0 / 62.9 GB (the arithmetic: docs/operations.md).
#     bash launch/opt/13b/single_gpu.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 13b rows of launch/opt/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 13b single_gpu "$@"
