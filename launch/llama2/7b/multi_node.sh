#!/usr/bin/env bash
# Llama-2-7b actor + Llama-2-7b reward model on several nodes of 8 GPUs of 80 GB listed in a DeepSpeed hostfile (HOSTFILE, default /job/hostfile).
#     bash launch/llama2/7b/multi_node.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Arguments, environment and output layout: launch/lib.sh. The whole pipeline: python e2e_rlhf.py --help.
# Same models and settings as single_node.sh beside it; only the launcher differs (deepspeed --hostfile).
NODE_DEPLOYMENT=multi_node
LAUNCH_SCRIPT_OVERRIDE="${BASH_SOURCE[0]}"
source "$(dirname "${BASH_SOURCE[0]}")/single_node.sh" "$@"
