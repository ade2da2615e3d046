"""Answers of a baseline and a fine-tuned model to the same prompts, side by side (one process, no DeepSpeed).

    python step1_sft/prompt_eval.py --model_name_or_path_baseline facebook/opt-1.3b \\
        --model_name_or_path_finetune output/opt-1.3b/sft [--prompts_file prompts.txt] [--max_new_tokens 128]

Prompts come from --prompts_file (.txt: one prompt per line; .jsonl: objects with a string "prompt") or
from the built-in list. A prompt already in the training convention "\\n\\nHuman: ...\\n\\nAssistant:" is used
verbatim; a bare question is wrapped in it (write a literal "\\n" in a .txt line for a newline). Prompts are
encoded as the data layer encodes them (no special tokens added) and answered one at a time, so no padding
is involved. Decoding is greedy by default (--temperature 0), so a rerun prints the same answers; with
--temperature > 0 both models sample with the same seed. An answer ends at EOS, at --max_new_tokens, or where
the model starts the next "Human:" turn itself.

This module also holds the loading and generation helpers that chat.py uses.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from common.data.chat_format import CHAT_TEMPLATE_MODES, ChatFormat, chat_format_for
from common.errors import exit_cleanly_on_user_errors
from common.files import jsonl_rows
from common.models.loading import load_tokenizer
from common.models.sampling import SamplingSettings, sample_answers
from common.training.ds_config import torch_dtype
from common.validate import check_model_path

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
STOP_TEXT = "Human:"  # a model that starts the user's next turn itself has finished its answer
BUILTIN_PROMPTS = (
    "How do I clean a cast iron pan?",
    "Can you give me a tip on how to prepare for a job interview?",
    "Is there an easy way to save money each month?",
    "Please tell me about Microsoft in a few sentences.",
    "Explain the moon landing to a 6 year old in a few sentences.",
    "Write a short poem about a wise frog.",
)


def wrap_prompt(text: str) -> str:
    """A bare question -> "\\n\\nHuman: {question}\\n\\nAssistant:"; a prompt ending in "Assistant:" unchanged."""
    if text.rstrip().endswith("Assistant:"):
        return text.rstrip()
    return f"{HUMAN} {text.strip()}{ASSISTANT}"


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt (one per non-empty line, literal \\n turned into newlines) or .jsonl file (a string
    "prompt" per line); ValueError naming the file and line for anything else."""
    path = Path(path)
    prompts: list[str] = []
    if path.suffix == ".jsonl":
        prompts = [row["prompt"] for row in jsonl_rows(path, ["prompt"])]
    elif path.suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    else:
        raise ValueError(f"{path}: unsupported prompts file type {path.suffix!r}; use .txt or .jsonl")
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


def load_for_generation(
    path: str, dtype: str = "auto", chat_template: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ChatFormat | None]:
    """A causal LM (safetensors only, no remote code) in eval mode on the GPU when there is one, its
    tokenizer (with a pad token distinct from EOS, as every stage uses) and the chat format to prompt it
    with (`common.data.chat_format.chat_format_for`: None for the plain rm-static text)."""
    check_model_path(
        "--path", path
    )  # a missing, pickled, truncated or damaged model: a sentence, not a traceback
    tokenizer = load_tokenizer(path)
    fmt = chat_format_for(path, tokenizer, chat_template)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), use_safetensors=True)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval(), tokenizer, fmt


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, fmt: ChatFormat | None) -> list[int]:
    """Token ids of an rm-static prompt as the model was trained on it: the plain text, or its chat-template
    rendering (the template's special tokens as special ids). Special-token strings inside the text (a user
    typing "<|im_end|>") are encoded as plain characters, never as the special token."""
    if fmt is None:  # as the data layer encodes text: a typed "<|endoftext|>" stays characters
        return tokenizer(prompt, add_special_tokens=False, split_special_tokens=True).input_ids
    specials = [t for t in tokenizer.all_special_tokens if t]
    if not any(t in prompt for t in specials):
        return tokenizer(fmt.prompt(prompt), add_special_tokens=False, split_special_tokens=False).input_ids
    # Typed text holding a special-token string: the template's own tokens stay special, the text stays text.
    ids: list[int] = []
    for piece, is_text in fmt.prompt_pieces(prompt):
        ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=is_text).input_ids
    return ids


@dataclass
class Generation:
    text: str  # the answer, cut before any STOP_TEXT and stripped of trailing whitespace
    new_tokens: int  # tokens generated (including the EOS when there is one)
    stop_reason: str  # "eos", "stop text" or "max_new_tokens"


def cut_answer(text: str) -> str:
    """The answer part of generated text: everything before the model's own next "Human:" turn."""
    return text.split(STOP_TEXT, 1)[0].rstrip()


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_beams: int = 1,
    max_prompt_tokens: int | None = None,
    streamer: BaseStreamer | None = None,
    fmt: ChatFormat | None = None,
) -> Generation:
    """Answer one rm-static prompt. temperature 0 is greedy (or beam search with num_beams > 1); otherwise
    sampling with top_k off. The prompt is encoded by `encode_prompt` and, beyond max_prompt_tokens, cut from
    the left. Stops at EOS (with a chat format: its end-of-turn token), at max_new_tokens, or at STOP_TEXT
    (plain text only: the model starting the next "Human:" turn itself)."""
    ids = torch.tensor([encode_prompt(tokenizer, prompt, fmt)])
    if max_prompt_tokens is not None:
        ids = ids[:, -max_prompt_tokens:]
    ids = ids.to(model.device)
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, num_beams=num_beams
    )
    answers = sample_answers(
        model,
        tokenizer,
        ids,
        torch.ones_like(ids),
        settings,
        stop_strings=[STOP_TEXT] if fmt is None else None,
        streamer=streamer,
    )
    new = answers.answers[0][answers.action_mask[0].bool()].tolist()
    raw = tokenizer.decode(new, skip_special_tokens=True)
    if new and new[-1] == tokenizer.eos_token_id:
        reason = "eos"
    elif STOP_TEXT in raw:
        reason = "stop text"
    else:
        reason = "max_new_tokens"
    return Generation(cut_answer(raw), len(new), reason)


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int) -> str:
    """Two texts in wrapped columns of `width` characters with a title above each."""

    def column(text: str) -> list[str]:
        lines = []
        for paragraph in text.split("\n"):
            lines += textwrap.wrap(paragraph, width) or [""]
        return lines

    a, b = (
        column(left_title) + ["-" * width] + column(left),
        column(right_title) + ["-" * width] + column(right),
    )
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return "\n".join(f"{x:<{width}} | {y}".rstrip() for x, y in zip(a, b, strict=True))


def add_chat_template_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chat_template",
        choices=CHAT_TEMPLATE_MODES,
        default="auto",
        help="Prompt with the model's chat template: 'auto' does so when the model was trained with "
        "--apply_chat_template (or, for a model no stage wrote, when its tokenizer has a template).",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Baseline vs fine-tuned answers, side by side")
    parser.add_argument("--model_name_or_path_baseline", required=True, help="e.g. the stage-1 base model")
    parser.add_argument("--model_name_or_path_finetune", required=True, help="e.g. the stage-1 or PPO output")
    parser.add_argument("--prompts_file", type=str, default=None, help=".txt or .jsonl (default: built-ins)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default).")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--num_beams", type=int, default=1, help="Beam search width (greedy decoding only).")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    parser.add_argument("--width", type=int, default=60, help="Characters per column.")
    add_chat_template_arg(parser)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max_new_tokens must be >= 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.num_beams < 1 or (args.num_beams > 1 and args.temperature > 0):
        parser.error("--num_beams must be >= 1, and beam search needs --temperature 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    exit_cleanly_on_user_errors()
    args = parse_args(argv)
    try:
        prompts = read_prompts(args.prompts_file) if args.prompts_file else list(BUILTIN_PROMPTS)
    except (OSError, ValueError) as e:
        raise SystemExit(f"prompt_eval: {e}") from None
    prompts = [wrap_prompt(p) for p in prompts]
    answers: dict[str, list[Generation]] = {}
    for name in (args.model_name_or_path_baseline, args.model_name_or_path_finetune):
        model, tokenizer, fmt = load_for_generation(name, args.dtype, args.chat_template)
        answers[name] = []
        for prompt in prompts:
            torch.manual_seed(args.seed)  # both models see the same random stream per prompt
            answers[name].append(
                generate(
                    model,
                    tokenizer,
                    prompt,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    num_beams=args.num_beams,
                    fmt=fmt,
                )
            )
        del model
    base, tuned = answers[args.model_name_or_path_baseline], answers[args.model_name_or_path_finetune]
    for i, prompt in enumerate(prompts):
        print(f"\n=== prompt {i + 1}/{len(prompts)}: {' '.join(prompt.split())}")
        print(
            side_by_side(
                f"baseline: {args.model_name_or_path_baseline} ({base[i].new_tokens} tokens, {base[i].stop_reason})",
                base[i].text,
                f"fine-tuned: {args.model_name_or_path_finetune} ({tuned[i].new_tokens} tokens, "
                f"{tuned[i].stop_reason})",
                tuned[i].text,
                args.width,
            )
        )


if __name__ == "__main__":
    main()
