#!/usr/bin/env bash
# Qwen2.5-7B actor + Qwen2.5-0.5B reward model on one GPU with 24 GB.
# Estimated peak memory, steps 1 / 2 / 3: GPU 18.5 / 18.6 / 21.0 GB, CPU RAM 3.9 / 5.9 / 20.9 GB (the arithmetic: docs/operations.md).
#     bash launch/qwen2.5/7b/single_gpu.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 7b rows of launch/qwen2.5/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 7b single_gpu "$@"
