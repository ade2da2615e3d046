#!/usr/bin/env bash
# Qwen2.5-1.5B actor + Qwen2.5-0.5B reward model on one GPU with 24 GB.
# Estimated peak memory, steps 1 / 2 / 3: GPU 9.6 / 12.3 / 14.8 GB, CPU RAM 18.5 / 0.0 / 24.5 GB (the arithmetic: docs/operations.md).
#     bash launch/qwen2.5/1.5b/single_gpu.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 1.5b rows of launch/qwen2.5/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 1.5b single_gpu "$@"
