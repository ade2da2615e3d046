# Shared body of every launch script. A model's script (launch/<family>/<size>/<deployment>.sh) sources its
# family's recipes.sh with SIZE DEPLOYMENT and its arguments; recipes.sh sources this file, sets the models,
# picks its row of `recipe` (below) and calls `launch`. The tiny script sources this file itself and sets the
# configuration variables (below) by hand.
#
# Usage of a launch script (one script per model size and deployment, one stage per call):
#     bash launch/<family>/<size>/<deployment>.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]
#   STEP               1 (SFT), 2 (reward model), 3 (PPO), dpo (DPO from the SFT model: the alternative to 2 + 3),
#                      kto, orpo, simpo (the other preference losses, DPO's stage with --loss_type, in OUTPUT/<STEP>),
#                      or a critic-free estimator in place of PPO's step 3 (same engines, no critic): grpo,
#                      dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline, dapo, gspo (in OUTPUT/<STEP>)
#   OUTPUT             the pipeline's output root: models in OUTPUT/sft, OUTPUT/rm, OUTPUT/ppo, each stage's
#                      (and OUTPUT/dpo), log in its directory (training.log), TensorBoard in OUTPUT/tensorboard/<stage>,
#                      tokenised-data cache in OUTPUT/data_cache
#   ZERO_STAGE         overrides the script's ZeRO stage of the trained model (step 1: the SFT model,
#                      step 2: the reward model, step 3: the actor, dpo: the policy); '' keeps the script's value
#   CRITIC_ZERO_STAGE  step 3 only: overrides the critic's ZeRO stage
#   --dry-run          print the final command(s), prefixed '+ ', and run nothing (also DRY_RUN=1)
#   -- FLAGS...        appended to the stage's command; a flag given twice takes the later value
# Environment: ACTOR_MODEL / REWARD_MODEL replace the scripts' hub ids (e.g. with local copies),
# NUM_GPUS (single_node, default 8), HOSTFILE (multi_node, default /job/hostfile), MASTER_PORT (29500),
# SEED (every stage's --seed, before the FLAGS after --; the tiny script's model init too: e2e_rlhf.py --seeds).
#
# Configuration a script sets before `launch`:
#   DEPLOYMENT      process (plain python: CPU or one GPU) | single_gpu | single_node | multi_node
#   ACTOR_MODEL     stage-1 base model;   REWARD_MODEL  stage-2 base model
#   DATA            array: --data_path ... --data_split ...
#   STEP1_ZERO STEP2_ZERO STEP3_ACTOR_ZERO STEP3_CRITIC_ZERO DPO_ZERO   default ZeRO stages
#   STEP1_ARGS STEP2_ARGS STEP3_ARGS DPO_ARGS                          arrays of the stages' other flags
#   KTO_ARGS ORPO_ARGS SIMPO_ARGS   arrays added after DPO_ARGS for that preference loss (all take DPO_ZERO):
#                   by default ORPO's lambda 0.1 and SimPO's beta 2.0 (their papers'; their beta is on another
#                   scale than DPO's), KTO none (its beta is DPO's, on the same log-ratios; its batch, which
#                   counts rows, two per pair, is twice DPO_ARGS' --per_device_train_batch_size)
#   CRITIC_FREE_ARGS  array added to STEP3_ARGS for every critic-free estimator (e.g. its own learning rate)
#   GROUP_ARGS      array added after it for the group estimators (grpo, dr_grpo, rloo, reinforce_pp_baseline):
#                   --num_samples_per_prompt n and a generation batch n times smaller, so an iteration
#                   generates as many answers as PPO's; grpo also gets --kl_in_loss (its paper's). dapo and gspo
#                   are grpo with their papers' policy losses: dapo clip-higher (0.2 / 0.28), a token-mean loss and
#                   the soft overlong punishment over the last quarter of the answer budget; gspo the sequence-level
#                   ratio clipped to [1 - 3e-4, 1 + 4e-4] and a per-answer mean. Both keep grpo's KL loss.
#   PREPARE         optional array, a command run before step 1 unless PREPARE_CREATES exists
#   REWARD_MEMBERS  reward models step 2 trains (default 1; the environment may set it): members 2..K go to
#                   OUTPUT/rm-2 ... rm-K first (stage 2 again on the same data slice, --data_split_seed, with seed
#                   100 x seed + k), OUTPUT/rm last, so rm/rm_metrics.json still means "step 2 finished"; PPO and
#                   the critic-free steps then score with the ensemble (--reward_ensemble_models, the
#                   aggregation of STEP3_ARGS or stage 3's default, min); DPO does not use them

set -euo pipefail

LAUNCH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LAUNCH_SCRIPT="${BASH_SOURCE[1]:-$0}"
if [[ "$LAUNCH_SCRIPT" == */recipes.sh ]]; then  # a model's script: recipes.sh SIZE DEPLOYMENT ARGS...
    LAUNCH_SCRIPT="${BASH_SOURCE[2]}"
    SIZE=$1
    DEPLOYMENT=$2
    shift 2
fi

launch_usage() {
    echo "usage: bash $LAUNCH_SCRIPT STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]] [--dry-run] [-- FLAGS...]" >&2
    echo "  $*" >&2
    exit 2
}

# ---- arguments
DRY_RUN="${DRY_RUN:-0}"
EXTRA=()
_positional=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) launch_usage "see the comment at the top of launch/lib.sh" ;;
        -*) launch_usage "unknown option $1 (stage flags go after --)" ;;
        *) _positional+=("$1") ;;
    esac
    shift
done
[ "${#_positional[@]}" -ge 2 ] || launch_usage "STEP and OUTPUT are required"
[ "${#_positional[@]}" -le 4 ] || launch_usage "too many arguments: ${_positional[*]}"
STEP="${_positional[0]}"
OUTPUT="${_positional[1]}"
ZERO_OVERRIDE="${_positional[2]:-}"
CRITIC_ZERO_OVERRIDE="${_positional[3]:-}"
CRITIC_FREE="grpo dr_grpo rloo reinforce_pp reinforce_pp_baseline dapo gspo"
PREFERENCE="dpo kto orpo simpo"
case " 1 2 3 $PREFERENCE $CRITIC_FREE " in *" $STEP "*) ;;
    *) launch_usage "STEP must be 1, 2, 3, one of $PREFERENCE or one of $CRITIC_FREE, got '$STEP'" ;; esac
for _z in "$ZERO_OVERRIDE" "$CRITIC_ZERO_OVERRIDE"; do
    case "$_z" in ''|0|1|2|3) ;; *) launch_usage "a ZeRO stage must be 0, 1, 2 or 3, got '$_z'" ;; esac
done
[ -z "$CRITIC_ZERO_OVERRIDE" ] || [ "$STEP" = 3 ] || launch_usage "CRITIC_ZERO_STAGE applies to step 3 only"
case "$OUTPUT" in /*) ;; *) OUTPUT="$PWD/$OUTPUT" ;; esac
OUTPUT="${OUTPUT%/}"

# The value of FLAG's last occurrence in the arguments after DEFAULT (DEFAULT if it has none).
_last_value() {
    local flag="$1" value="$2"
    shift 2
    while [ $# -gt 0 ]; do
        if [ "$1" = "$flag" ] && [ $# -gt 1 ]; then value="$2"; fi
        shift
    done
    echo "$value"
}

# ---- defaults a script may override
DATA=()
STEP1_ARGS=()
STEP2_ARGS=()
STEP3_ARGS=()
DPO_ARGS=()
KTO_ARGS=()
ORPO_ARGS=(--beta 0.1)
SIMPO_ARGS=(--beta 2.0)
CRITIC_FREE_ARGS=()
GROUP_ARGS=()
PREPARE=()
PREPARE_CREATES=""
REWARD_MEMBERS_ENV="${REWARD_MEMBERS:-}"  # the environment's value wins over the script's
REWARD_MEMBERS=1

# ---- the recipes of launch/<family>/recipes.sh: one row per model size and deployment
# recipe S1_ZERO S1_BATCH S1_ACCUM  S2_ZERO S2_BATCH S2_ACCUM  ACTOR_ZERO CRITIC_ZERO GEN_BATCH TRAIN_BATCH PPO_ACCUM  [OPTION...]
# sets STEP*_ZERO and STEP*_ARGS: DeepSpeed-Chat's settings (sequence 512, PPO 256 + 256, cosine schedules, lr
# 9.65e-6 / RM_LR / 5e-6, weight decay 0.1, gradient checkpointing, LoRA dim 128 at lr 5e-4) with the family's
# DTYPE, LORA_MODULE and RM_LR, the row's ZeRO stages and per-GPU batch sizes (eval batch = train batch), and
# OPTIONs:  sft_offload sft_lora | rm_offload rm_lora rm_chosen (normalise on chosen answers, not SFT samples) |
#           ppo_offload offload_ref offload_reward actor_lora critic_lora hybrid (DeepSpeed's hybrid engine)
RECIPE_OPTIONS=" sft_offload sft_lora rm_offload rm_lora rm_chosen ppo_offload offload_ref offload_reward actor_lora critic_lora hybrid "

recipe() {
    [ $# -ge 11 ] || { echo "launch: recipe needs 11 numbers, got: $*" >&2; exit 2; }
    recipe_data
    STEP1_ZERO=$1 STEP2_ZERO=$4 STEP3_ACTOR_ZERO=$7 STEP3_CRITIC_ZERO=$8 DPO_ZERO=$7
    local s1_batch=$2 s1_accum=$3 s2_batch=$5 s2_accum=$6 gen=$9 train=${10} accum=${11} opt
    shift 11
    local options=" $* "
    for opt in "$@"; do
        [[ "$RECIPE_OPTIONS" == *" $opt "* ]] || { echo "launch: unknown recipe option '$opt'" >&2; exit 2; }
    done
    _on() { [[ "$options" == *" $1 "* ]]; }
    local lora=(--lora_dim 128 --lora_module_name "$LORA_MODULE" --only_optimize_lora --lora_learning_rate 5e-4)
    local schedule=(--weight_decay 0.1 --num_train_epochs 1 --lr_scheduler_type cosine --num_warmup_steps 0
        --seed 1234 --dtype "$DTYPE" --gradient_checkpointing)

    STEP1_ARGS=(--max_seq_len 512 --per_device_train_batch_size "$s1_batch" --per_device_eval_batch_size "$s1_batch"
        --gradient_accumulation_steps "$s1_accum" --learning_rate 9.65e-6 "${schedule[@]}")
    if _on sft_offload; then STEP1_ARGS+=(--offload); fi
    if _on sft_lora; then STEP1_ARGS+=("${lora[@]}"); fi

    STEP2_ARGS=(--max_seq_len 512 --per_device_train_batch_size "$s2_batch" --per_device_eval_batch_size "$s2_batch"
        --gradient_accumulation_steps "$s2_accum" --learning_rate "$RM_LR" "${schedule[@]}"
        --eval_interval 100 --eval_iters 50)
    if _on rm_offload; then STEP2_ARGS+=(--offload); fi
    if _on rm_lora; then STEP2_ARGS+=("${lora[@]}"); fi
    if _on rm_chosen; then STEP2_ARGS+=(--normalization_sample chosen); fi

    STEP3_ARGS=(--max_prompt_seq_len 256 --max_answer_seq_len 256
        --per_device_generation_batch_size "$gen" --per_device_training_batch_size "$train"
        --gradient_accumulation_steps "$accum" --generation_batches 1 --ppo_epochs 1 --num_train_epochs 1
        --actor_learning_rate 9.65e-6 --critic_learning_rate 5e-6 --actor_weight_decay 0.1 --critic_weight_decay 0.1
        --lr_scheduler_type cosine --num_warmup_steps 100 --seed 1234 --dtype "$DTYPE"
        --actor_gradient_checkpointing --critic_gradient_checkpointing)
    # The group estimators: 4 answers per prompt from a generation batch 4 times smaller (at least 1 prompt).
    GROUP_ARGS=(--num_samples_per_prompt 4 --per_device_generation_batch_size "$(( gen >= 4 ? gen / 4 : 1 ))")
    if _on ppo_offload; then STEP3_ARGS+=(--offload); fi
    if _on offload_ref; then STEP3_ARGS+=(--offload_reference_model); fi
    if _on offload_reward; then STEP3_ARGS+=(--offload_reward_model); fi
    if _on hybrid; then STEP3_ARGS+=(--enable_hybrid_engine); fi
    if _on actor_lora; then
        STEP3_ARGS+=(--actor_lora_dim 128 --actor_lora_module_name "$LORA_MODULE" --actor_lora_learning_rate 5e-4); fi
    if _on critic_lora; then
        STEP3_ARGS+=(--critic_lora_dim 128 --critic_lora_module_name "$LORA_MODULE" --critic_lora_learning_rate 5e-4); fi
    if _on actor_lora || _on critic_lora; then STEP3_ARGS+=(--only_optimize_lora); fi

    # DPO trains the policy (the actor's ZeRO stage and batch) on stage 2's pairs: DPO's paper settings (beta
    # 0.1, lr 1e-6 after a warm-up), one epoch; its held-out answers are sampled like stage 3's.
    DPO_ARGS=(--max_seq_len 512 --per_device_train_batch_size "$train" --per_device_eval_batch_size "$train"
        --gradient_accumulation_steps "$accum" --learning_rate 1e-6 --beta 0.1 "${schedule[@]}"
        --eval_interval 100 --eval_iters 50 --max_prompt_seq_len 256 --max_answer_seq_len 256)
    if _on actor_lora; then DPO_ARGS+=("${lora[@]}"); fi
    if _on ppo_offload; then DPO_ARGS+=(--offload); fi
}

# The deployment's data: DeepSpeed-Chat's Dahoas/rm-static on one GPU, its four-dataset mix on a node or cluster.
recipe_data() {
    if [ "$DEPLOYMENT" = single_gpu ]; then
        DATA=(--data_path Dahoas/rm-static --data_split 2,4,4)
    else
        DATA=(--data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise
            yitingxie/rlhf-reward-datasets --data_split 2,4,4)
    fi
}

_launcher() {
    case "$DEPLOYMENT" in
        process) LAUNCHER=(python) ;;
        single_gpu) LAUNCHER=(deepspeed --num_gpus 1 --master_port "${MASTER_PORT:-29500}") ;;
        single_node) LAUNCHER=(deepspeed --num_gpus "${NUM_GPUS:-8}" --master_port "${MASTER_PORT:-29500}") ;;
        multi_node)
            LAUNCHER=(deepspeed --hostfile "${HOSTFILE:-/job/hostfile}" --master_port "${MASTER_PORT:-29500}") ;;
        *) echo "launch: unknown DEPLOYMENT '$DEPLOYMENT' in $LAUNCH_SCRIPT" >&2; exit 2 ;;
    esac
}

_print_cmd() {  # one line, '+ ' then the words, shell-quoted where needed
    local line="+" word
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then line+=" $word"; else line+=" $(printf '%q' "$word")"; fi
    done
    printf '%s\n' "$line"
}

_require() {  # _require PATH WHAT: a stage input that must exist (real runs only)
    if [ ! -e "$1" ]; then
        echo "launch: step $STEP needs $2 at $1, which does not exist: run the earlier step first" >&2
        exit 1
    fi
}

# Build the stage's command into CMD and its output directory into STAGE_DIR.
_stage_command() {
    _launcher
    REWARD_MEMBERS="${REWARD_MEMBERS_ENV:-$REWARD_MEMBERS}"
    [[ "$REWARD_MEMBERS" =~ ^[1-9][0-9]*$ ]] || launch_usage "REWARD_MEMBERS must be a positive integer, got '$REWARD_MEMBERS'"
    case "$STEP" in
        1)
            STAGE_DIR="$OUTPUT/sft"
            CMD=("${LAUNCHER[@]}" step1_sft/main.py --model_name_or_path "$ACTOR_MODEL" "${DATA[@]}"
                --data_output_path "$OUTPUT/data_cache" --zero_stage "${ZERO_OVERRIDE:-$STEP1_ZERO}"
                "${STEP1_ARGS[@]}" --enable_tensorboard --tensorboard_path "$OUTPUT/tensorboard/sft"
                --output_dir "$STAGE_DIR") ;;
        2)
            STAGE_DIR="$OUTPUT/rm"
            CMD=("${LAUNCHER[@]}" step2_reward/main.py --model_name_or_path "$REWARD_MODEL" "${DATA[@]}"
                --data_output_path "$OUTPUT/data_cache" --zero_stage "${ZERO_OVERRIDE:-$STEP2_ZERO}"
                --normalization_policy_path "$OUTPUT/sft" "${STEP2_ARGS[@]}"
                --enable_tensorboard --tensorboard_path "$OUTPUT/tensorboard/rm" --output_dir "$STAGE_DIR") ;;
        3)
            STAGE_DIR="$OUTPUT/ppo"
            CMD=("${LAUNCHER[@]}" step3_rlhf/main.py --actor_model_name_or_path "$OUTPUT/sft"
                --critic_model_name_or_path "$OUTPUT/rm" "${DATA[@]}" --data_output_path "$OUTPUT/data_cache"
                --actor_zero_stage "${ZERO_OVERRIDE:-$STEP3_ACTOR_ZERO}"
                --critic_zero_stage "${CRITIC_ZERO_OVERRIDE:-$STEP3_CRITIC_ZERO}" "${STEP3_ARGS[@]}"
                --enable_tensorboard --tensorboard_path "$OUTPUT/tensorboard/ppo" --output_dir "$STAGE_DIR") ;;
        dpo|kto|orpo|simpo)
            STAGE_DIR="$OUTPUT/$STEP"
            local loss=()
            case "$STEP" in
                dpo) ;;  # DPO_ARGS (or the stage) picks the loss: sigmoid by default, ipo
                kto)  # KTO's batch counts rows, two per pair: twice DPO's, so a step sees as many sequences
                    local pairs
                    pairs="$(_last_value --per_device_train_batch_size 16 "${DPO_ARGS[@]}")"
                    loss=(--loss_type kto --per_device_train_batch_size "$(( 2 * pairs ))" "${KTO_ARGS[@]}") ;;
                orpo) loss=(--loss_type orpo "${ORPO_ARGS[@]}") ;;
                simpo) loss=(--loss_type simpo "${SIMPO_ARGS[@]}") ;;
            esac
            CMD=("${LAUNCHER[@]}" step2_dpo/main.py --model_name_or_path "$OUTPUT/sft" "${DATA[@]}"
                --data_output_path "$OUTPUT/data_cache" --zero_stage "${ZERO_OVERRIDE:-$DPO_ZERO}" "${DPO_ARGS[@]}"
                "${loss[@]}" --enable_tensorboard --tensorboard_path "$OUTPUT/tensorboard/$STEP"
                --output_dir "$STAGE_DIR") ;;
        *)  # a critic-free estimator: stage 3 without a critic, the reward model of stage 2 as reward
            STAGE_DIR="$OUTPUT/$STEP"
            local name="$STEP"
            case "$STEP" in dapo|gspo) name=grpo ;; esac  # GRPO's advantages with their policy losses
            local estimator=(--advantage_estimator "$name" "${CRITIC_FREE_ARGS[@]}")
            if [ "$STEP" != reinforce_pp ]; then estimator+=("${GROUP_ARGS[@]}"); fi
            case "$STEP" in
                grpo) estimator+=(--kl_in_loss) ;;
                dapo)
                    local budget
                    budget="$(_last_value --max_answer_seq_len 256 "${STEP3_ARGS[@]}" "${EXTRA[@]}")"
                    estimator+=(--kl_in_loss --clip_ratio_low 0.2 --clip_ratio_high 0.28 --loss_agg token_mean
                        --overlong_buffer_len "$(( budget / 4 ))") ;;
                gspo)
                    estimator+=(--kl_in_loss --ratio_level sequence --clip_ratio_low 3e-4 --clip_ratio_high 4e-4
                        --loss_agg seq_mean_token_mean) ;;
            esac
            CMD=("${LAUNCHER[@]}" step3_rlhf/main.py --actor_model_name_or_path "$OUTPUT/sft"
                --reward_model_name_or_path "$OUTPUT/rm" "${DATA[@]}" --data_output_path "$OUTPUT/data_cache"
                --actor_zero_stage "${ZERO_OVERRIDE:-$STEP3_ACTOR_ZERO}" "${STEP3_ARGS[@]}" "${estimator[@]}"
                --enable_tensorboard --tensorboard_path "$OUTPUT/tensorboard/$STEP" --output_dir "$STAGE_DIR") ;;
    esac
    if [ -n "${SEED:-}" ]; then CMD+=(--seed "$SEED"); fi
    case "$STEP" in 1|2|dpo|kto|orpo|simpo) ;; *) if [ "$REWARD_MEMBERS" -gt 1 ]; then
        CMD+=(--reward_ensemble_models)
        for ((_k = 2; _k <= REWARD_MEMBERS; _k++)); do CMD+=("$OUTPUT/rm-$_k"); done
    fi ;; esac
    CMD+=("${EXTRA[@]}")
}

# The seed of step 2's command: the last --seed in it (SEED or the script's), 1234 when none.
_step2_seed() {
    local seed=1234 i
    for ((i = 0; i < ${#CMD[@]} - 1; i++)); do [ "${CMD[$i]}" != --seed ] || seed="${CMD[$((i + 1))]}"; done
    echo "$seed"
}

# REWARD_MEMBERS > 1: step 2's further members, rm-2 ... rm-K, each the step-2 command with its own output,
# seed and TensorBoard directory (later flags win) on the main model's data slice; finished ones are skipped
# unless the FLAGS after -- hold --overwrite_output_dir (a rerun of step 2 then retrains every member).
_train_reward_members() {
    local seed k member overwrite=0 flag
    seed="$(_step2_seed)"
    for flag in "${EXTRA[@]}"; do [ "$flag" != --overwrite_output_dir ] || overwrite=1; done
    for ((k = 2; k <= REWARD_MEMBERS; k++)); do
        member=("${CMD[@]}" --output_dir "$OUTPUT/rm-$k" --seed "$((100 * seed + k))" --data_split_seed "$seed"
            --tensorboard_path "$OUTPUT/tensorboard/rm-$k")
        if [ "$DRY_RUN" != 1 ] && [ "$overwrite" = 0 ] && [ -f "$OUTPUT/rm-$k/rm_metrics.json" ]; then
            echo "[launch] reward-model member $k: $OUTPUT/rm-$k is finished, skipped"
            continue
        fi
        _print_cmd "${member[@]}"
        [ "$DRY_RUN" = 1 ] || "${member[@]}"
    done
}

# Run (or print) the configured stage. Output goes to the terminal and to STAGE_DIR/training.log.
launch() {
    _stage_command
    local prepare=0
    if [ "$STEP" = 1 ] && [ "${#PREPARE[@]}" -gt 0 ] && [ ! -e "$PREPARE_CREATES" ]; then prepare=1; fi
    if [ "$DRY_RUN" = 1 ]; then
        [ "$prepare" = 0 ] || _print_cmd "${PREPARE[@]}"
        if [ "$STEP" = 2 ]; then _train_reward_members; fi
        _print_cmd "${CMD[@]}"
        return 0
    fi
    case "$STEP" in
        2|dpo|kto|orpo|simpo) _require "$OUTPUT/sft/config.json" "the stage-1 model" ;;
        1) ;;
        *) _require "$OUTPUT/sft/config.json" "the stage-1 model"
           _require "$OUTPUT/rm/config.json" "the stage-2 reward model"
           for ((_k = 2; _k <= REWARD_MEMBERS; _k++)); do
               _require "$OUTPUT/rm-$_k/config.json" "reward-model member $_k (REWARD_MEMBERS=$REWARD_MEMBERS)"
           done ;;
    esac
    if [ "$DEPLOYMENT" = multi_node ] && [ ! -f "${HOSTFILE:-/job/hostfile}" ]; then
        echo "launch: hostfile ${HOSTFILE:-/job/hostfile} not found: write one line per node, e.g." \
            "'worker-1 slots=8', and pass HOSTFILE=path (see docs/operations.md, 'Running on a node or a cluster')" >&2
        exit 1
    fi
    mkdir -p "$STAGE_DIR"
    local log="$STAGE_DIR/training.log"
    cd "$LAUNCH_ROOT"
    export PYTHONUNBUFFERED=1
    export PYTHONPATH="$LAUNCH_ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the stages import common/ from the checkout
    local status=0
    {
        echo "[launch] $(date '+%Y-%m-%d %H:%M:%S') $LAUNCH_SCRIPT step $STEP"
        if [ "$prepare" = 1 ]; then _print_cmd "${PREPARE[@]}"; "${PREPARE[@]}"; fi
        if [ "$STEP" = 2 ]; then _train_reward_members; fi
        _print_cmd "${CMD[@]}"
        "${CMD[@]}"
    } 2>&1 | tee -a "$log" || status=$?  # -a: a resumed or repeated run keeps the earlier log
    [ "$status" = 0 ] || echo "launch: step $STEP failed (exit $status); its log: $log" >&2
    return "$status"
}
