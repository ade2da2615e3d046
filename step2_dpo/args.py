"""DPO flags: the shared groups of a one-model stage (common.args, the preference data and split of stage 2)
plus the preference loss (DPO, IPO, KTO, ORPO, SimPO), the frozen reference and the held-out gold evaluation,
with the checks run before any compute."""

from __future__ import annotations

import argparse

from common.args import (
    add_gold_reward_arg,
    add_pair_eval_args,
    add_prompt_answer_length_args,
    add_single_model_args,
    parse_stage_args,
)
from common.rl_math import PREFERENCE_METHODS


def add_dpo_args(parser: argparse.ArgumentParser) -> None:
    """DPO-only flags (TRL's and OpenRLHF's names where they exist)."""
    g = parser.add_argument_group("DPO")
    g.add_argument(
        "--loss_type",
        choices=sorted(PREFERENCE_METHODS),
        default="sigmoid",
        help="sigmoid: DPO (conservative DPO with --label_smoothing); ipo: IPO; kto: KTO on labelled rows (the "
        "data's unpaired prompt/completion/label rows, and each pair as a desirable and an undesirable row; the "
        "batch counts rows); orpo: ORPO, SFT plus an odds-ratio term, no reference; simpo: SimPO, a "
        "length-normalised margin, no reference. Without a reference no second model is loaded.",
    )
    g.add_argument(
        "--beta",
        type=float,
        default=None,
        help="The loss's strength (default: its paper's: "
        + ", ".join(f"{k} {m.beta:g}" for k, m in sorted(PREFERENCE_METHODS.items()))
        + "): DPO's, IPO's and KTO's beta (the implicit KL to the reference), ORPO's lambda, SimPO's beta.",
    )
    g.add_argument(
        "--label_smoothing",
        type=float,
        default=0.0,
        help="Conservative DPO: the probability that a pair's label is flipped, in [0, 0.5) (sigmoid only).",
    )
    g.add_argument(
        "--simpo_gamma",
        type=float,
        default=None,
        help="SimPO's target margin gamma (default: beta / 2, the paper's gamma/beta ratio).",
    )
    g.add_argument(
        "--desirable_weight",
        type=float,
        default=1.0,
        help="KTO: the weight of the desirable rows' loss (the paper keeps desirable_weight * n_desirable / "
        "(undesirable_weight * n_undesirable) in [1, 4/3]; pairs give as many of each).",
    )
    g.add_argument(
        "--undesirable_weight", type=float, default=1.0, help="KTO: the weight of the undesirable rows' loss."
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
        help="The frozen reference policy of sigmoid, ipo and kto (default: --model_name_or_path, the stage-1 "
        "model). With --lora_dim and --only_optimize_lora the reference is the policy with its adapters "
        "disabled, and no second model is loaded.",
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
    method = PREFERENCE_METHODS[args.loss_type]
    if args.beta is None:
        args.beta = method.beta
    if not args.beta > 0:
        raise SystemExit(f"--beta must be > 0, got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        raise SystemExit(f"--label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing and args.loss_type != "sigmoid":
        raise SystemExit("--label_smoothing is conservative DPO's: it needs --loss_type sigmoid")
    if args.simpo_gamma is not None and args.loss_type != "simpo":
        raise SystemExit("--simpo_gamma is SimPO's target margin: it needs --loss_type simpo")
    if args.loss_type == "simpo":
        args.simpo_gamma = args.beta / 2 if args.simpo_gamma is None else args.simpo_gamma
        if not args.simpo_gamma >= 0:
            raise SystemExit(f"--simpo_gamma must be >= 0, got {args.simpo_gamma}")
    if (args.desirable_weight, args.undesirable_weight) != (1.0, 1.0) and args.loss_type != "kto":
        raise SystemExit("--desirable_weight and --undesirable_weight are KTO's: they need --loss_type kto")
    if not (args.desirable_weight > 0 and args.undesirable_weight > 0):
        raise SystemExit(
            f"--desirable_weight and --undesirable_weight must be > 0, got {args.desirable_weight} and "
            f"{args.undesirable_weight}"
        )
    if not method.reference and args.reference_model_name_or_path is not None:
        raise SystemExit(
            f"--loss_type {args.loss_type} has no reference: drop --reference_model_name_or_path"
        )
    if args.loss_type == "orpo" and args.sft_loss_coef:
        raise SystemExit("--loss_type orpo holds the chosen responses' NLL already: drop --sft_loss_coef")
    if args.sft_loss_coef < 0:
        raise SystemExit(f"--sft_loss_coef must be >= 0, got {args.sft_loss_coef}")
    if args.eval_interval < 0 or args.eval_iters < 0 or args.eval_num_prompts < 0:
        raise SystemExit("--eval_interval, --eval_iters and --eval_num_prompts must be >= 0")
    if not args.temperature > 0:
        raise SystemExit(f"--temperature must be > 0, got {args.temperature}")
    return args
