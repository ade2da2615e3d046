#!/usr/bin/env bash
# OPT-66b actor + OPT-350m reward model on one GPU with 24 GB.
# Estimated peak memory, steps 1 / 2 / 3: GPU 2.9 / 2.3 / 7.0 GB, CPU RAM 153.1 / 4.0 / 288.5 GB (the arithmetic: docs/operations.md).
#     bash launch/opt/66b/single_gpu.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 66b rows of launch/opt/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 66b single_gpu "$@"
