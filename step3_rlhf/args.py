"""Stage-3 flags: the shared groups from common.args (prefixed per model) plus PPO's own.

Every PPO constant DeepSpeed-Chat hard-codes is a flag here with the reference default documented
(docs/ppo-fidelity.md item numbers in brackets).
"""

from __future__ import annotations

import argparse

from common.args import (
    add_checkpoint_args,
    add_data_args,
    add_deepspeed_args,
    add_gold_reward_arg,
    add_lora_args,
    add_model_args,
    add_output_args,
    add_training_args,
    parse_stage_args,
)
from common.rl_math import (
    ADVANTAGE_ESTIMATORS,
    ENSEMBLE_AGGREGATIONS,
    LOSS_AGGREGATIONS,
    POLICY_RATIO_LEVELS,
    get_advantage_estimator,
)
from common.validate import reward_model_path


def add_ppo_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("PPO")
    g.add_argument(
        "--per_device_generation_batch_size", type=int, default=16, help="Prompts per rank per generation."
    )
    g.add_argument(
        "--num_samples_per_prompt",
        type=int,
        default=1,
        help="Answers sampled per prompt (a group; >= 2 for the group estimators). A generation batch holds "
        "--per_device_generation_batch_size x this answers, each group in one batch on one rank.",
    )
    g.add_argument(
        "--per_device_training_batch_size", type=int, default=16, help="Micro-batch for PPO updates."
    )
    g.add_argument("--generation_batches", type=int, default=1, help="Generation batches per PPO iteration.")
    g.add_argument("--ppo_epochs", type=int, default=1, help="Passes over each rollout [19].")
    g.add_argument("--num_train_epochs", type=int, default=1, help="Passes over the prompt set.")
    g.add_argument("--actor_learning_rate", type=float, default=9.65e-6)
    g.add_argument("--critic_learning_rate", type=float, default=5e-6)
    g.add_argument("--actor_weight_decay", type=float, default=0.0)
    g.add_argument("--critic_weight_decay", type=float, default=0.0)
    # sampling [5, 6]
    g.add_argument(
        "--temperature", type=float, default=0.7, help="Sampling temperature; log-probs use it too."
    )
    g.add_argument("--top_k", type=int, default=0, help="0 = no top-k filtering (the references' setting).")
    g.add_argument("--top_p", type=float, default=1.0, help="1.0 = no nucleus filtering.")
    g.add_argument(
        "--no_sample", dest="do_sample", action="store_false", help="Greedy rollouts (not advised)."
    )
    g.add_argument(
        "--generation_use_cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="KV cache during generation (--no-generation_use_cache exists for benchmarks).",
    )
    # reward [8, 14]
    g.add_argument(
        "--reward_model_name_or_path",
        type=str,
        default=None,
        help="Frozen reward model (default: --critic_model_name_or_path, as in DeepSpeed-Chat).",
    )
    g.add_argument(
        "--reward_model_coef",
        type=float,
        default=1.0,
        help="Weight of the reward model's normalised score in the reward (0: no reward model is loaded).",
    )
    g.add_argument(
        "--reward_ensemble_models",
        nargs="*",
        default=[],
        metavar="PATH",
        help="More reward models (the same tokenizer; stage 2 with other seeds): the reward model's score becomes "
        "the --reward_ensemble_aggregation of its and their normalised scores (Coste et al. 2023). The critic "
        "still starts from --critic_model_name_or_path. Given without paths: no ensemble (a launch script's "
        "members are dropped).",
    )
    g.add_argument(
        "--reward_ensemble_aggregation",
        choices=ENSEMBLE_AGGREGATIONS,
        default="min",
        help="How the ensemble's scores combine (common.rl_math.ensemble_scores): min measured best on the "
        "bundled task's gold (docs/stages.md, 'Reward-model ensembles').",
    )
    g.add_argument(
        "--reward_ensemble_std_coef",
        type=float,
        default=1.0,
        help="lambda of mean_minus_std: mean - lambda x std over the members.",
    )
    g.add_argument(
        "--reward_fn",
        type=str,
        default=None,
        metavar="MODULE:FUNCTION",
        help="A reward function fn(prompts, responses, finished, **extra_columns) -> one score per answer "
        "(common/evaluation/score_fn.py), e.g. common.evaluation.gold:synthetic_gold; summed with the reward model's score "
        "(weights --reward_fn_coef, --reward_model_coef) or alone when there is no reward model.",
    )
    g.add_argument("--reward_fn_coef", type=float, default=1.0, help="Weight of --reward_fn's score.")
    g.add_argument(
        "--clip_reward_value", type=float, default=5.0, help="Clip RM scores to +-this (DS-Chat: 5)."
    )
    g.add_argument(
        "--overlong_buffer_len",
        type=int,
        default=0,
        help="DAPO's soft overlong punishment: add --overlong_penalty_factor x (limit - len) / this to the score of "
        "an answer longer than --max_answer_seq_len minus this, -factor at the limit (0: off).",
    )
    g.add_argument("--overlong_penalty_factor", type=float, default=1.0, help="See --overlong_buffer_len.")
    g.add_argument(
        "--missing_eos_penalty",
        type=float,
        default=None,
        help="Score given instead of the RM's to responses that hit the length limit without EOS "
        "(the references use -1); off by default. Like RM scores it is then clipped to +-clip_reward_value.",
    )
    # KL [14, 15]
    g.add_argument(
        "--init_kl_coef", type=float, default=0.1, help="KL coefficient beta (DS-Chat 0.1, N+ 0.05)."
    )
    g.add_argument(
        "--kl_estimator", choices=["k1", "k2", "k3", "abs"], default="k1", help="Per-token KL estimator."
    )
    g.add_argument(
        "--kl_clamp", type=float, default=None, help="Clamp per-token KL to +-this (OpenRLHF: 10)."
    )
    g.add_argument("--adaptive_kl", action="store_true", help="Ziegler's adaptive KL controller.")
    g.add_argument(
        "--kl_target", type=float, default=6.0, help="Adaptive controller's target KL (per sequence)."
    )
    g.add_argument("--kl_horizon", type=float, default=10000, help="Adaptive controller's horizon.")
    g.add_argument(
        "--kl_in_loss",
        action="store_true",
        help="KL to the reference as a loss term (--kl_loss_coef x --kl_loss_estimator, as in GRPO) instead "
        "of a per-token reward penalty (then none is put in the reward).",
    )
    g.add_argument(
        "--kl_loss_coef", type=float, default=0.04, help="Coefficient of the KL loss (GRPO: 0.04)."
    )
    g.add_argument("--kl_loss_estimator", choices=["k1", "k2", "k3"], default="k3", help="KL loss estimator.")
    # advantages [16, 17]
    g.add_argument(
        "--advantage_estimator",
        choices=sorted(ADVANTAGE_ESTIMATORS),
        default="gae",
        help="gae: PPO with a critic; grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline: critic-free "
        "(no critic engine is built), the group ones need --num_samples_per_prompt >= 2 (common/rl_math/).",
    )
    g.add_argument("--gamma", type=float, default=1.0)
    g.add_argument("--lam", type=float, default=0.95)
    g.add_argument(
        "--group_std_eps", type=float, default=1e-6, help="eps of GRPO's (s - mean) / (std + eps)."
    )
    g.add_argument(
        "--whiten_advantages",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Whiten advantages over the rollout (default: the estimator's: yes for gae and reinforce_pp*, "
        "no for grpo, dr_grpo, rloo).",
    )
    g.add_argument(
        "--whiten_rewards", action="store_true", help="Scale per-token rewards (mean kept) before GAE."
    )
    # losses [18]
    g.add_argument("--cliprange", type=float, default=0.2, help="Policy ratio clip epsilon.")
    g.add_argument(
        "--clip_ratio_low",
        type=float,
        default=None,
        help="The ratio's lower clip 1 - this (default: --cliprange).",
    )
    g.add_argument(
        "--clip_ratio_high",
        type=float,
        default=None,
        help="The ratio's upper clip 1 + this (default: the lower one); DAPO's clip-higher: 0.28 with 0.2.",
    )
    g.add_argument(
        "--dual_clip",
        type=float,
        default=None,
        help="Dual-clip PPO: cap a token's loss at -A x this where A < 0 (> 1; 3 in Ye et al. 2020). Off by default.",
    )
    g.add_argument(
        "--ratio_level",
        choices=POLICY_RATIO_LEVELS,
        default="token",
        help="token: PPO's per-token ratio; sequence: GSPO's length-normalised ratio of the whole answer, "
        "clipped per answer (use it with tiny clip ranges, e.g. --clip_ratio_low 3e-4 --clip_ratio_high 4e-4).",
    )
    g.add_argument(
        "--mask_truncated_answers",
        action="store_true",
        help="Leave answers that hit --max_answer_seq_len without EOS out of the policy loss (DAPO's "
        "overlong filtering); they still count in the KL loss and the statistics.",
    )
    g.add_argument("--cliprange_value", type=float, default=0.2, help="Value clip range around old values.")
    g.add_argument("--entropy_coef", type=float, default=0.0, help="Entropy bonus coefficient.")
    g.add_argument(
        "--loss_agg",
        choices=LOSS_AGGREGATIONS,
        default=None,
        help="How the policy (and KL) loss reduces its tokens (common.rl_math.aggregate_loss). Default: the "
        "estimator's: seq_mean_token_mean for grpo, seq_mean_token_sum_norm over --max_answer_seq_len for "
        "dr_grpo, token_mean otherwise.",
    )
    # ptx and EMA [20]
    g.add_argument(
        "--unsupervised_dataset_name",
        type=str,
        default=None,
        help="Pretraining text (hub name or local .txt/.jsonl/.json/.parquet with a 'text' field).",
    )
    g.add_argument("--unsupervised_dataset_config_name", type=str, default=None)
    g.add_argument("--unsup_coef", type=float, default=27.8, help="PPO-ptx coefficient on the LM loss.")
    g.add_argument("--enable_ema", action="store_true", help="Keep an EMA copy of the actor and save it.")
    g.add_argument("--ema_beta", type=float, default=0.992)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engines")
    g.add_argument("--actor_zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    g.add_argument("--critic_zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    g.add_argument("--offload_reference_model", action="store_true")
    g.add_argument("--offload_reward_model", action="store_true")
    g.add_argument(
        "--enable_hybrid_engine",
        action="store_true",
        help="DeepSpeed hybrid engine for generation (falls back to generate() where unsupported).",
    )
    g.add_argument("--unpin_actor_parameters", action="store_true")
    g.add_argument("--release_inference_cache", action="store_true")
    g.add_argument("--inference_tp_size", type=int, default=1)
    g.add_argument("--tp_gather_partition_size", type=int, default=8)
    g.add_argument(
        "--gather_actor_for_generation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Actor under ZeRO-3 without hybrid-engine kernels: gather its weights once per generation batch "
        "instead of at every decode step (one full copy per rank while generating, as the hybrid engine "
        "keeps). Default: when that copy takes at most half of the free accelerator memory on every rank "
        "(always on CPU); --no-gather_actor_for_generation never, --gather_actor_for_generation always.",
    )


def add_compat_args(parser: argparse.ArgumentParser) -> None:
    """DeepSpeed-Chat step-3 flags whose purpose is always met here, so its scripts carry over, and the
    two it has that this project does not implement (refused with a message rather than ignored)."""
    g = parser.add_argument_group("DeepSpeed-Chat compatibility")
    g.add_argument(
        "--num_padding_at_beginning",
        type=int,
        default=1,
        help="Ignored: scores are read at the last valid token found through the attention mask.",
    )
    g.add_argument(
        "--disable_actor_dropout",
        action="store_true",
        help="Ignored: dropout is always off in PPO (--actor_dropout defaults to 0).",
    )
    g.add_argument(
        "--disable_critic_dropout",
        action="store_true",
        help="Ignored: dropout is always off in PPO (--critic_dropout defaults to 0).",
    )
    g.add_argument("--enable_mixed_precision_lora", action="store_true", help="Not implemented (refused).")
    g.add_argument("--align_overflow", action="store_true", help="Not implemented (refused).")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run control")
    g.add_argument(
        "--eval_interval",
        type=int,
        default=None,
        help="Evaluate on held-out prompts every N iterations, besides before and after training (0: "
        "only before and after). Default: iterations // 6, at least 1, so a run of 6 or more iterations "
        "has 5 or 6 evaluations during PPO.",
    )
    add_gold_reward_arg(g)
    g.add_argument(
        "--eval_num_prompts",
        type=int,
        default=256,
        help="Held-out prompts sampled and scored at each evaluation (the first N of the eval split; 0: all). "
        "Each evaluation generates an answer per prompt, so the whole eval split of a real dataset (5103 "
        "prompts for Dahoas/rm-static) would cost more than the PPO iterations between evaluations.",
    )
    g.add_argument("--print_answers", action="store_true")
    g.add_argument("--print_answers_interval", type=int, default=1)
    g.add_argument("--enable_test_mode", action="store_true", help="Stop after --test_stop_step iterations.")
    g.add_argument("--test_stop_step", type=int, default=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Stage 3: PPO with actor, reference, critic and reward engines"
    )
    add_model_args(parser, prefix="actor_", dropout_default=0.0)
    add_model_args(parser, prefix="critic_", required=False, dropout_default=0.0)
    add_data_args(parser, stage=3)
    add_training_args(parser, stage=3)
    add_lora_args(parser, prefix="actor_")
    add_lora_args(parser, prefix="critic_")
    add_deepspeed_args(parser, stage=3)
    add_engine_args(parser)
    add_ppo_args(parser)
    add_run_args(parser)
    add_compat_args(parser)
    add_output_args(parser)
    add_checkpoint_args(parser)
    args = parse_stage_args(parser, argv)
    check_ppo_args(args)
    return args


def check_ppo_args(args: argparse.Namespace) -> None:
    """Batch-size arithmetic, ranges and the estimator's needs, before any model is loaded; resolves the
    estimator's defaults (--whiten_advantages, --loss_agg) into `args`."""
    estimator = get_advantage_estimator(args.advantage_estimator)
    n = args.num_samples_per_prompt
    if n < 1:
        raise SystemExit(f"--num_samples_per_prompt must be >= 1, got {n}")
    if estimator.needs_groups and n < 2:
        raise SystemExit(
            f"--advantage_estimator {args.advantage_estimator} compares the answers to one prompt, so it needs "
            f"--num_samples_per_prompt >= 2 (got {n})"
        )
    if estimator.needs_critic and not args.critic_model_name_or_path:
        raise SystemExit(
            f"--advantage_estimator {args.advantage_estimator} trains a critic: give --critic_model_name_or_path "
            "(the reward model of stage 2)"
        )
    if reward_model_path(args) is None and args.reward_fn is None:
        raise SystemExit(
            "stage 3 needs a reward: a reward model (--reward_model_name_or_path, or --critic_model_name_or_path) "
            "and/or a reward function (--reward_fn module:function)"
        )
    if args.reward_ensemble_models and reward_model_path(args) is None:
        raise SystemExit(
            "--reward_ensemble_models adds members to the reward model, but there is none (--reward_model_coef 0, "
            "or no --reward_model_name_or_path / --critic_model_name_or_path); give --reward_ensemble_models "
            "with no paths (or REWARD_MEMBERS=1 to the launch scripts) to drop them"
        )
    if args.reward_ensemble_std_coef < 0:
        raise SystemExit(f"--reward_ensemble_std_coef must be >= 0, got {args.reward_ensemble_std_coef}")
    if args.kl_in_loss and args.adaptive_kl:
        raise SystemExit("--adaptive_kl adapts the KL penalty in the reward; with --kl_in_loss there is none")
    if args.clip_ratio_low is None:
        args.clip_ratio_low = args.cliprange
    if args.clip_ratio_high is None:
        args.clip_ratio_high = args.clip_ratio_low
    for flag in ("cliprange", "clip_ratio_low", "clip_ratio_high"):
        if not getattr(args, flag) > 0:
            raise SystemExit(f"--{flag} must be > 0, got {getattr(args, flag)}")
    if args.clip_ratio_low >= 1:
        raise SystemExit(
            f"--clip_ratio_low must be < 1 (the ratio's lower bound 1 - it), got {args.clip_ratio_low}"
        )
    if args.dual_clip is not None and not args.dual_clip > 1:
        raise SystemExit(f"--dual_clip must be > 1, got {args.dual_clip}")
    if not 0 <= args.overlong_buffer_len <= args.max_answer_seq_len:
        raise SystemExit(
            f"--overlong_buffer_len must be in [0, --max_answer_seq_len {args.max_answer_seq_len}], "
            f"got {args.overlong_buffer_len}"
        )
    if args.overlong_penalty_factor < 0:
        raise SystemExit(f"--overlong_penalty_factor must be >= 0, got {args.overlong_penalty_factor}")
    if args.whiten_advantages is None:
        args.whiten_advantages = estimator.whiten
    if args.loss_agg is None:
        args.loss_agg = estimator.loss_agg
    rollout = args.per_device_generation_batch_size * args.generation_batches * n
    minibatch = args.per_device_training_batch_size * args.gradient_accumulation_steps
    if rollout % minibatch:
        raise SystemExit(
            f"per-rank rollout size (--per_device_generation_batch_size {args.per_device_generation_batch_size} x "
            f"--generation_batches {args.generation_batches} x --num_samples_per_prompt {n} = {rollout}) "
            "must be a multiple of the PPO minibatch "
            f"(--per_device_training_batch_size {args.per_device_training_batch_size} x "
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps} = {minibatch})"
        )
    if args.temperature <= 0:
        raise SystemExit(f"--temperature must be > 0 (got {args.temperature}); use --no_sample for greedy")
    if args.max_prompt_seq_len < 1 or args.max_answer_seq_len < 1:
        raise SystemExit("--max_prompt_seq_len and --max_answer_seq_len must be positive")
    for flag in ("enable_mixed_precision_lora", "align_overflow"):
        if getattr(args, flag):
            raise SystemExit(
                f"--{flag} (DeepSpeed-Chat, fp16/quantised LoRA on GPUs) is not implemented here"
            )
    if args.enable_test_mode and args.test_stop_step < 1:
        raise SystemExit("--enable_test_mode needs --test_stop_step >= 1")
