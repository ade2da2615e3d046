"""Score prompt/response pairs with a trained reward model and print a table (one process, no DeepSpeed).

    python step2_reward/rw_eval.py --model_name_or_path out/rm \
        --prompt $'\n\nHuman: How do I boil an egg?\n\nAssistant:' --response ' Boil it for eight minutes.' \
        --prompt $'\n\nHuman: How do I boil an egg?\n\nAssistant:' --response ' No idea.'
    python step2_reward/rw_eval.py --model_name_or_path out/rm --input_file pairs.jsonl  # {"prompt", "response"}

A single --prompt with several --response flags scores every response against that prompt. Texts are
used verbatim (the bundled and DeepSpeed-Chat data use the "\\n\\nHuman: ...\\n\\nAssistant:" prompt
convention and responses that start with a space; --wrap applies that convention to bare texts). Each
sequence is tokenized exactly as the data layer tokenizes reward-model rows: prompt and response encoded
separately without special tokens, the EOS id appended, and the prompt cut from the left when the whole
exceeds --max_seq_len. The table shows the raw score and the normalised score (gain * raw + bias, with
the gain and bias stored in the model by stage 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from common.data import pad_sequences
from common.data.tokenize import encode_texts, fit_to_length
from common.errors import exit_cleanly_on_user_errors
from common.files import jsonl_rows
from common.models.loading import load_tokenizer
from common.models.reward_model import RewardModel
from common.validate import check_model_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Score prompt/response pairs with a reward model")
    parser.add_argument("--model_name_or_path", required=True, help="A reward model saved by stage 2.")
    parser.add_argument("--prompt", action="append", default=[], help="A prompt (repeatable).")
    parser.add_argument("--response", action="append", default=[], help="A response (repeatable).")
    parser.add_argument(
        "--input_file", type=str, default=None, help="JSON lines with string fields 'prompt' and 'response'."
    )
    parser.add_argument("--max_seq_len", type=int, default=512, help="Maximum prompt+response+EOS tokens.")
    parser.add_argument("--batch_size", type=int, default=8, help="Sequences per forward pass.")
    parser.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="Precision of the forward pass."
    )
    parser.add_argument(
        "--wrap",
        action="store_true",
        help="Wrap bare texts in the training convention: prompt -> '\\n\\nHuman: {prompt}\\n\\nAssistant:', "
        "response -> ' {response}'.",
    )
    parser.add_argument("--width", type=int, default=40, help="Characters of each text shown in the table.")
    args = parser.parse_args(argv)
    if not args.input_file and not args.response:
        parser.error("give --prompt/--response pairs or --input_file")
    return args


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, response) of every non-empty line of a JSON-lines file; errors name the file and line."""
    pairs = [(row["prompt"], row["response"]) for row in jsonl_rows(path, ["prompt", "response"])]
    if not pairs:
        raise ValueError(f"{path}: no pairs found")
    return pairs


def pairs_from_flags(prompts: Sequence[str], responses: Sequence[str]) -> list[tuple[str, str]]:
    """Pair the i-th --prompt with the i-th --response; one prompt goes with every response."""
    if len(prompts) == 1:
        prompts = list(prompts) * len(responses)
    if len(prompts) != len(responses):
        raise ValueError(
            f"got {len(prompts)} --prompt and {len(responses)} --response flags: give one prompt per "
            "response, or a single prompt for all responses"
        )
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True), start=1):
        if not prompt.strip() or not response.strip():
            raise ValueError(f"pair {i}: empty prompt or response")
    return list(zip(prompts, responses, strict=True))


def wrap_pair(prompt: str, response: str) -> tuple[str, str]:
    """A bare question and answer in the "\\n\\nHuman: ...\\n\\nAssistant:" + " answer" convention."""
    return f"\n\nHuman: {prompt.strip()}\n\nAssistant:", f" {response.strip()}"


def tokenize_pairs(
    tokenizer, pairs: Sequence[tuple[str, str]], max_seq_len: int, origins: Sequence[str] | None = None
) -> list[list[int]]:
    """prompt + response + [eos] token ids per pair, as the data layer builds reward-model sequences."""
    prompts = encode_texts(tokenizer, [p for p, _ in pairs])
    responses = encode_texts(tokenizer, [r for _, r in pairs])
    sequences = []
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        fitted = fit_to_length(prompt, response + [tokenizer.eos_token_id], max_seq_len)
        if fitted is None:
            where = origins[i] if origins else f"pair {i + 1}"
            raise ValueError(
                f"{where}: the response is {len(response)} tokens + EOS, which leaves no room for the prompt "
                f"within --max_seq_len {max_seq_len}"
            )
        sequences.append(fitted[0])
    return sequences


@torch.no_grad()
def score_sequences(
    rm: RewardModel, sequences: Sequence[list[int]], pad_token_id: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw and normalised scores, each (N,) float32, of N token-id sequences (right-padded per batch)."""
    device = next(rm.parameters()).device
    raw = []
    for start in range(0, len(sequences), batch_size):
        chunk = [torch.tensor(s, dtype=torch.long) for s in sequences[start : start + batch_size]]
        ids, mask = pad_sequences(chunk, pad_token_id, "right")
        raw.append(rm(ids.to(device), mask.to(device)).scores.cpu())
    raw_scores = torch.cat(raw)
    return raw_scores, rm.normalize_scores(raw_scores)


def _snippet(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def format_table(
    pairs: Sequence[tuple[str, str]], raw: torch.Tensor, normalized: torch.Tensor, width: int
) -> str:
    """One row per pair: index, prompt snippet, response snippet, raw score, normalised score."""
    header = f"{'#':>3}  {'prompt':<{width}}  {'response':<{width}}  {'raw':>10}  {'normalised':>10}"
    lines = [header, "-" * len(header)]
    for i, ((prompt, response), r, n) in enumerate(
        zip(pairs, raw.tolist(), normalized.tolist(), strict=True)
    ):
        lines.append(
            f"{i + 1:>3}  {_snippet(prompt, width):<{width}}  {_snippet(response, width):<{width}}  "
            f"{r:>10.4f}  {n:>10.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    exit_cleanly_on_user_errors()
    args = parse_args(argv)
    check_model_path("--model_name_or_path", args.model_name_or_path)  # truncated, missing value head...
    try:
        if args.input_file:
            pairs = read_pairs(args.input_file)
            origins = [f"{args.input_file} pair {i + 1}" for i in range(len(pairs))]
        else:
            pairs, origins = pairs_from_flags(args.prompt, args.response), None
        if args.wrap:
            pairs = [wrap_pair(p, r) for p, r in pairs]
        tokenizer = load_tokenizer(args.model_name_or_path)
        sequences = tokenize_pairs(tokenizer, pairs, args.max_seq_len, origins)
    except (ValueError, OSError) as e:
        raise SystemExit(f"rw_eval: {e}") from None
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    try:  # a causal LM here would score with a random head
        rm = RewardModel.from_pretrained(args.model_name_or_path, dtype=dtype, require_saved_head=True).eval()
    except ValueError as e:
        raise SystemExit(f"rw_eval: {e}") from None
    if torch.cuda.is_available():
        rm = rm.cuda()
    raw, normalized = score_sequences(rm, sequences, tokenizer.pad_token_id, args.batch_size)
    print(f"reward model {args.model_name_or_path}: normalised = {rm.gain:.6g} * raw + {rm.bias:.6g}")
    if rm.normalization_sample:
        print(f"normalisation sample: {rm.normalization_sample}")
    print(format_table(pairs, raw, normalized, args.width))


if __name__ == "__main__":
    main()
