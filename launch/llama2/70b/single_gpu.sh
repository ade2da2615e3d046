#!/usr/bin/env bash
# Llama-2-70b actor + Llama-2-7b reward model on one GPU with 24 GB.
# Estimated peak memory, steps 1 / 2 / 3: GPU 2.3 / 1.5 / 4.8 GB, CPU RAM 164.5 / 18.6 / 334.5 GB (the arithmetic: docs/operations.md).
#     bash launch/llama2/70b/single_gpu.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 70b rows of launch/llama2/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 70b single_gpu "$@"
