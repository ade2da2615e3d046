"""Stage 2's checks of its flags against the models they name, before any compute (see common/validate.py).

The reward model's trunk is checked as stage 1 checks its model (path and weights, tokenizer vs vocabulary,
--max_seq_len, LoRA names on the trunk). The normalisation policy (step2_reward/normalize.py) is checked only
when it is used: its path and weights, its tokenizer (it must be the reward model's, since the reward model
reads the token ids the policy samples), its vocabulary and positions against --max_seq_len.
"""

from __future__ import annotations

import argparse
from typing import Any

from common.data.tokenize import tokenizer_fingerprint
from common.models.loading import load_tokenizer
from common.validate import (
    check_length,
    check_lora_modules,
    check_model_path,
    check_vocab,
    load_checked_tokenizer,
)
from step2_reward.normalize import resolve_sample


def validate_reward(args: argparse.Namespace) -> None:
    """Stage 2: as stage 1 for the reward model's trunk, plus the normalisation policy when it is used.
    Every failure is a SystemExit naming the flag, the path and what is wrong."""
    flag, path = "--model_name_or_path", args.model_name_or_path
    config = _check_model(args, flag, path)
    tokenizer = load_checked_tokenizer(flag, path)
    check_vocab(flag, path, tokenizer, config)
    check_length(flag, path, config, args.max_seq_len, f"--max_seq_len {args.max_seq_len}")
    if args.lora_dim > 0:
        check_lora_modules("--lora_module_name", args.lora_module_name, flag, path, config, trunk=True)
    if resolve_sample(args) != "policy":
        return
    pflag, ppath = "--normalization_policy_path", args.normalization_policy_path
    pconfig = _check_model(args, pflag, ppath)
    load_checked_tokenizer(pflag, ppath)
    if tokenizer_fingerprint(load_tokenizer(ppath)) != tokenizer_fingerprint(load_tokenizer(path)):
        raise SystemExit(
            f"{pflag} {ppath}: its tokenizer differs from the reward model's ({flag} {path}), so the token "
            "ids it samples would mean something else to the reward model; use a policy trained with the "
            "same tokenizer (e.g. the stage-1 output of the same base model)"
        )
    check_vocab(pflag, ppath, tokenizer, pconfig, f"{flag} {path}")
    check_length(pflag, ppath, pconfig, args.max_seq_len, f"--max_seq_len {args.max_seq_len}")


def _check_model(args: argparse.Namespace, flag: str, path: str) -> Any:
    return check_model_path(
        flag, path, trust_remote_code=args.trust_remote_code, allow_pickle_weights=args.allow_pickle_weights
    )
