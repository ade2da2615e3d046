#!/usr/bin/env bash
# Qwen2.5-7B actor + Qwen2.5-0.5B reward model on one node with 8 GPUs of 80 GB (NUM_GPUS=n for another count; per-GPU batch sizes stay).
#     bash launch/qwen2.5/7b/single_node.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
# Arguments, environment and output layout: launch/lib.sh. The whole pipeline: python e2e_rlhf.py --help.
source "$(dirname "${BASH_SOURCE[0]}")/../../lib.sh" "$@"

DEPLOYMENT="${NODE_DEPLOYMENT:-single_node}"
ACTOR_MODEL="${ACTOR_MODEL:-Qwen/Qwen2.5-7B}"
REWARD_MODEL="${REWARD_MODEL:-Qwen/Qwen2.5-0.5B}"
DATA=(--data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets --data_split 2,4,4)

STEP1_ZERO=3
STEP1_ARGS=(
    --max_seq_len 512 --per_device_train_batch_size 4 --per_device_eval_batch_size 4
    --gradient_accumulation_steps 2 --learning_rate 9.65e-6 --weight_decay 0.1 --num_train_epochs 1
    --lr_scheduler_type cosine --num_warmup_steps 0 --seed 1234 --dtype bf16 --gradient_checkpointing
)
STEP2_ZERO=2
STEP2_ARGS=(
    --max_seq_len 512 --per_device_train_batch_size 8 --per_device_eval_batch_size 8
    --gradient_accumulation_steps 1 --learning_rate 5e-5 --weight_decay 0.1 --num_train_epochs 1
    --lr_scheduler_type cosine --num_warmup_steps 0 --seed 1234 --dtype bf16 --gradient_checkpointing
    --eval_interval 100 --eval_iters 50
)
STEP3_ACTOR_ZERO=3
STEP3_CRITIC_ZERO=2
STEP3_ARGS=(
    --max_prompt_seq_len 256 --max_answer_seq_len 256
    --per_device_generation_batch_size 4 --per_device_training_batch_size 4 --gradient_accumulation_steps 1
    --generation_batches 1 --ppo_epochs 1 --num_train_epochs 1
    --actor_learning_rate 9.65e-6 --critic_learning_rate 5e-6 --actor_weight_decay 0.1 --critic_weight_decay 0.1
    --lr_scheduler_type cosine --num_warmup_steps 100 --seed 1234 --dtype bf16
    --actor_gradient_checkpointing --critic_gradient_checkpointing
)
launch
