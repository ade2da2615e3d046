#!/usr/bin/env bash
# OPT-6.7b actor + OPT-350m reward model on one GPU with 24 GB.
# Estimated peak memory, steps 1 / 2 / 3: GPU 16.5 / 17.6 / 19.2 GB, CPU RAM 3.6 / 4.0 / 20.9 GB (the arithmetic: docs/operations.md).
#     bash launch/opt/6.7b/single_gpu.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 6.7b rows of launch/opt/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 6.7b single_gpu "$@"
