"""The prologue every stage runs, in the same order, before it reads data or builds a model."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from common import dist
from common.errors import exit_cleanly_on_user_errors
from common.models.loading import load_tokenizer
from common.training.engines import device, set_seed
from common.training.output_dir import check_output_dir


class StageStart(NamedTuple):
    args: argparse.Namespace
    device: torch.device
    tokenizer: Any  # PreTrainedTokenizerBase, with a pad token distinct from EOS


def start_stage(
    stage: str,
    argv: Sequence[str] | None,
    parse_args: Callable[[Sequence[str] | None], argparse.Namespace],
    validate: Callable[[argparse.Namespace], None],
    model_flag: str = "model_name_or_path",
) -> StageStart:
    """Parse the flags, join the ranks, check the flags against the models they name (`validate`: paths,
    weights, tokenizers, lengths, LoRA names), refuse an output directory this run must not touch, seed every
    RNG, and load the tokenizer of `args.<model_flag>`. A user error from here on exits with its message,
    without a traceback. Nothing is written and no model or data is loaded before this returns."""
    exit_cleanly_on_user_errors()
    args = parse_args(argv)
    dist.init_distributed()
    validate(args)
    check_output_dir(args.output_dir, stage, args)
    set_seed(args.seed)
    tokenizer = load_tokenizer(
        getattr(args, model_flag), getattr(args, "trust_remote_code", False), args.apply_chat_template
    )
    return StageStart(args, device(), tokenizer)
