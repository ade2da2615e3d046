#!/usr/bin/env bash
# Llama-2-7b actor + Llama-2-7b reward model on one GPU with 24 GB.
# Estimated peak memory, steps 1 / 2 / 3: GPU 16.4 / 14.7 / 17.2 GB, CPU RAM 3.8 / 18.6 / 49.4 GB (the arithmetic: docs/operations.md).
#     bash launch/llama2/7b/single_gpu.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 7b rows of launch/llama2/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 7b single_gpu "$@"
