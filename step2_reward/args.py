"""Stage-2 flags: the shared groups from common.args plus the reward model's own and the normalisation's
(step2_reward/normalize.py), and the cross-flag checks run before any compute."""

from __future__ import annotations

import argparse

from common.args import add_pair_eval_args, add_single_model_args, parse_stage_args
from step2_reward.normalize import add_normalization_args, check_normalization_args


def add_reward_args(parser: argparse.ArgumentParser) -> None:
    """Stage-2-only flags (DeepSpeed-Chat's step-2 names where they exist)."""
    g = parser.add_argument_group("reward model")
    add_pair_eval_args(g)
    g.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="Loss -logsigmoid(r_chosen - r_rejected - margin); 0 is the plain pairwise loss.",
    )
    g.add_argument(
        "--num_padding_at_beginning",
        type=int,
        default=1,
        help="Accepted for DeepSpeed-Chat compatibility and ignored: the score is read at the last valid "
        "token found through the attention mask, whatever the padding.",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stage 2: reward model")
    add_single_model_args(parser, stage=2)
    add_reward_args(parser)
    add_normalization_args(parser)
    args = parse_stage_args(parser, argv)
    if args.trust_remote_code:
        raise SystemExit(
            "--trust_remote_code: the reward model loads only built-in transformers architectures"
        )
    if args.eval_interval < 0 or args.eval_iters < 0:
        raise SystemExit("--eval_interval and --eval_iters must be >= 0")
    check_normalization_args(args)
    return args
