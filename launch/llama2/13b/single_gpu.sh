#!/usr/bin/env bash
# Llama-2-13b actor + Llama-2-7b reward model on one GPU with 24 GB.
# Estimated peak memory, steps 1 / 2 / 3: GPU 1.7 / 1.5 / 3.2 GB, CPU RAM 34.0 / 18.6 / 92.1 GB (the arithmetic: docs/operations.md).
#     bash launch/llama2/13b/single_gpu.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 13b rows of launch/llama2/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 13b single_gpu "$@"
