"""Convert a DeepSpeed-Chat step-2 reward model to this project's reward-model layout, once, on disk.

    python -m tools.convert_dschat SRC DST [--allow_pickle_weights]

SRC is what DeepSpeed-Chat's step 2 writes: config.json, the trunk and head in one state dict
(pytorch_model.bin, or safetensors) with keys `rwtransformer.<trunk key>` and `v_head.weight` (shape
(1, d), no bias), and tokenizer files. DST gets the trunk as model.safetensors, the head as
value_head.safetensors with bias 0, gain 1 / bias 0 (no normalisation) in config.json's `reward_model`
entry (see common/models/reward_model.py), and SRC's tokenizer files copied byte for byte: a directory that
`RewardModel.from_pretrained` and every stage read without --allow_pickle_weights.

The stages also convert such a checkpoint on load (reward model, critic, stage-2 starting point), with
one message; this command writes the result once, as safetensors. Reading pytorch_model.bin unpickles it,
which can run code: it needs --allow_pickle_weights, as everywhere else.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from common.models.reward_model import RewardModel
from common.models.weights import (
    DSCHAT_HEAD_KEY,
    DSCHAT_TRUNK_PREFIX,
    checkpoint_keys,
    is_dschat_reward_layout,
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
)


def convert(src: str | Path, dst: str | Path, allow_pickle_weights: bool = False) -> Path:
    """Write the DeepSpeed-Chat reward model in `src` to `dst` (new or empty) in our layout; returns dst.

    Raises ValueError when `src` is not in DeepSpeed-Chat's layout or `dst` is not empty, before writing."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst}: exists and is not an empty directory; choose a new output directory")
    keys = checkpoint_keys(src, allow_pickle_weights)
    if not is_dschat_reward_layout(keys):
        shown = ", ".join(sorted(keys)[:3])
        raise ValueError(
            f"{src}: not a DeepSpeed-Chat reward model: its weights are {shown}, ... "
            f"(expected {DSCHAT_TRUNK_PREFIX}<trunk key> and {DSCHAT_HEAD_KEY} only)"
        )
    rm = RewardModel.from_pretrained(
        src, dtype="auto", use_safetensors=None if allow_pickle_weights else True
    )
    rm.save_pretrained(dst)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.convert_dschat", description=__doc__.split("\n")[0]
    )
    parser.add_argument("src", help="DeepSpeed-Chat step-2 output directory")
    parser.add_argument("dst", help="new (or empty) output directory")
    parser.add_argument(
        "--allow_pickle_weights",
        action="store_true",
        help="read pytorch_model.bin (unpickling can run code: only for a directory you trust)",
    )
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.allow_pickle_weights)
    except (ValueError, FileNotFoundError) as e:
        print(f"convert_dschat: {e}", file=sys.stderr)
        return 1
    print(f"convert_dschat: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
