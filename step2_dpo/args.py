"""DPO flags: the shared groups of a one-model stage (common.args, the preference data and split of stage 2)
plus the preference loss, the frozen reference and the held-out gold evaluation, with the checks run before
any compute."""

from __future__ import annotations

import argparse

from common.args import (
    add_gold_reward_arg,
    add_pair_eval_args,
    add_prompt_answer_length_args,
    add_single_model_args,
    parse_stage_args,
)
from common.rl_math import PREFERENCE_LOSSES


def add_dpo_args(parser: argparse.ArgumentParser) -> None:
    """DPO-only flags (TRL's and OpenRLHF's names where they exist)."""
    g = parser.add_argument_group("DPO")
    g.add_argument(
        "--beta", type=float, default=0.1, help="Strength of the implicit KL to the reference (DPO's beta)."
    )
    g.add_argument(
        "--loss_type",
        choices=sorted(PREFERENCE_LOSSES),
        default="sigmoid",
        help="sigmoid: DPO (conservative DPO with --label_smoothing); ipo: IPO.",
    )
    g.add_argument(
        "--label_smoothing",
        type=float,
        default=0.0,
        help="Conservative DPO: the probability that a pair's label is flipped, in [0, 0.5) (sigmoid only).",
    )
    g.add_argument(
        "--sft_loss_coef",
        type=float,
        default=0.0,
        help="Add this times the chosen responses' token-mean negative log-likelihood to the loss (0: off).",
    )
    g.add_argument(
        "--reference_model_name_or_path",
        type=str,
        default=None,
        help="The frozen reference policy (default: --model_name_or_path, the stage-1 model). With "
        "--lora_dim and --only_optimize_lora the reference is the policy with its adapters disabled, and no "
        "second model is loaded.",
    )
    add_pair_eval_args(g)  # --eval_interval also samples the held-out answers


def add_heldout_args(parser: argparse.ArgumentParser) -> None:
    """Sampled answers to held-out prompts, graded by the gold: the same prompts, budget and sampling as
    stage 3's evaluation, so a DPO policy and a PPO policy of the same stage-1 model compare directly."""
    g = parser.add_argument_group("held-out answers")
    g.add_argument(
        "--eval_num_prompts",
        type=int,
        default=256,
        help="Held-out prompts (the first N of the stage-3 eval split; 0: none) answered before and after "
        "training and at each --eval_interval.",
    )
    add_prompt_answer_length_args(g)
    g.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (stage 3's).")
    add_gold_reward_arg(g)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DPO: the stage-1 policy trained on preference pairs")
    add_single_model_args(parser, stage=2)
    add_dpo_args(parser)
    add_heldout_args(parser)
    args = parse_stage_args(parser, argv)
    if not args.beta > 0:
        raise SystemExit(f"--beta must be > 0, got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        raise SystemExit(f"--label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing and args.loss_type != "sigmoid":
        raise SystemExit("--label_smoothing is conservative DPO's: it needs --loss_type sigmoid")
    if args.sft_loss_coef < 0:
        raise SystemExit(f"--sft_loss_coef must be >= 0, got {args.sft_loss_coef}")
    if args.eval_interval < 0 or args.eval_iters < 0 or args.eval_num_prompts < 0:
        raise SystemExit("--eval_interval, --eval_iters and --eval_num_prompts must be >= 0")
    if not args.temperature > 0:
        raise SystemExit(f"--temperature must be > 0, got {args.temperature}")
    return args
