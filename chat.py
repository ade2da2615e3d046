"""Chat with a trained model in the terminal: multi-turn, the answer printed token by token as it is generated.

    python chat.py --path output/tiny/ppo/actor [--max_new_tokens 128] [--temperature 0.7]
    printf 'How do I bake bread?\\nAnd cookies?\\nquit\\n' | python chat.py --path output/tiny/ppo/actor

Each user line is one turn. The model sees the whole conversation in the training format,
"\\n\\nHuman: <turn 1>\\n\\nAssistant: <answer 1>\\n\\nHuman: <turn 2>\\n\\nAssistant:", and its answer stops at EOS,
at --max_new_tokens, or where it starts the next "Human:" turn itself (that text is neither shown nor kept).
A model trained with --apply_chat_template (or a chat model no stage wrote, such as the materialised
SmolLM2-135M-Instruct) sees the same conversation rendered by its chat template and stops at its end-of-turn
token (--chat_template auto|on|off).
When the conversation outgrows the model's context, the oldest turns are dropped. Commands: 'clear' forgets
the history, 'quit' or 'exit' (or the end of the input) ends. A line on stderr after each answer gives the
prompt and answer lengths in tokens and why the answer stopped. No DeepSpeed: a plain Hugging Face model
on the GPU when there is one, else the CPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from common.data.chat_format import ChatFormat
from common.errors import exit_cleanly_on_user_errors
from step1_sft.prompt_eval import (
    ASSISTANT,
    HUMAN,
    STOP_TEXT,
    Generation,
    add_chat_template_arg,
    encode_prompt,
    generate,
    load_for_generation,
)

QUIT = {"quit", "exit"}
CLEAR = "clear"


def format_conversation(history: Sequence[tuple[str, str]], user: str) -> str:
    """The prompt for the next answer: past (user, answer) turns, then the new user turn and "Assistant:".
    Answers are stored as generated (usually with a leading space) and joined verbatim."""
    past = "".join(f"{HUMAN} {u}{ASSISTANT}{a}" for u, a in history)
    return f"{past}{HUMAN} {user}{ASSISTANT}"


def fit_conversation(
    tokenizer: PreTrainedTokenizerBase,
    history: list[tuple[str, str]],
    user: str,
    max_prompt_tokens: int,
    fmt: ChatFormat | None = None,
) -> tuple[str, int]:
    """Drop the oldest turns until the prompt fits in max_prompt_tokens; returns (prompt, dropped turns).
    A single turn that is still too long is cut from the left by `generate`."""
    dropped = 0
    while True:
        prompt = format_conversation(history[dropped:], user)
        if dropped == len(history) or len(encode_prompt(tokenizer, prompt, fmt)) <= max_prompt_tokens:
            return prompt, dropped
        dropped += 1


class AnswerStreamer(TextStreamer):
    """Writes the answer to `out` as words are completed, stopping before STOP_TEXT, so the streamed text is
    exactly the answer that goes into the history. Text that could be the start of STOP_TEXT, and trailing
    whitespace, are held back until the next words show whether they belong to the answer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out
        self.text = ""  # everything decoded so far
        self.shown = 0  # characters of self.text already written
        self.writes = 0

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        visible = self.text.split(STOP_TEXT, 1)[0]
        if not stream_end and STOP_TEXT not in self.text:
            for k in range(min(len(STOP_TEXT), len(visible)), 0, -1):  # hold back a partial STOP_TEXT
                if visible.endswith(STOP_TEXT[:k]):
                    visible = visible[:-k]
                    break
        end = len(visible.rstrip())  # trailing whitespace waits for more text: the stored answer is stripped
        if end > self.shown:
            self.out.write(visible[self.shown : end])
            self.out.flush()
            self.shown = end
            self.writes += 1
        if stream_end:
            self.out.write("\n")
            self.out.flush()


def chat(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    lines: Iterable[str],
    out: TextIO,
    err: TextIO,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    echo: bool = False,
    fmt: ChatFormat | None = None,
) -> list[tuple[str, str]]:
    """Run the conversation over user `lines` and return the final history [(user, answer)].

    Answers are streamed to `out` after "Assistant:"; `echo` also writes each user line (for piped input)."""
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    max_prompt_tokens = context - max_new_tokens
    if max_prompt_tokens < 1:
        raise SystemExit(
            f"--max_new_tokens {max_new_tokens} leaves no room in the model's {context}-token context"
        )
    history: list[tuple[str, str]] = []
    for line in lines:
        user = line.strip()
        if not user:
            continue
        if echo:
            out.write(f"Human: {user}\n")
        if user.lower() in QUIT:
            break
        if user.lower() == CLEAR:
            history = []
            err.write("[history cleared]\n")
            continue
        prompt, dropped = fit_conversation(tokenizer, history, user, max_prompt_tokens, fmt)
        history = history[dropped:]
        prompt_tokens = len(encode_prompt(tokenizer, prompt, fmt))
        out.write("Assistant:" if fmt is None else "Assistant: ")  # plain-text answers start with a space
        out.flush()
        result: Generation = generate(
            model,
            tokenizer,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            max_prompt_tokens=max_prompt_tokens,
            streamer=AnswerStreamer(tokenizer, out),
            fmt=fmt,
        )
        history.append((user, result.text))
        note = f", dropped {dropped} oldest turn(s)" if dropped else ""
        err.write(
            f"[turn {len(history)}: prompt {prompt_tokens} tokens, answer {result.new_tokens} tokens, "
            f"stopped at {result.stop_reason}{note}]\n"
        )
        err.flush()
    return history


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat with a causal LM (multi-turn, streaming)")
    parser.add_argument("--path", required=True, help="Model directory (e.g. OUT/ppo/actor) or hub id.")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="Longest answer in tokens.")
    parser.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature; 0 = greedy.")
    parser.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling threshold (1 = off).")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    add_chat_template_arg(parser)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max_new_tokens must be >= 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    exit_cleanly_on_user_errors()
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer, fmt = load_for_generation(args.path, args.dtype, args.chat_template)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.path}; 'clear' forgets the conversation, 'quit' ends it")

    def user_lines() -> Iterable[str]:
        while True:
            try:
                yield input("Human: ") if interactive else next(sys.stdin)
            except (EOFError, StopIteration):
                return

    chat(
        model,
        tokenizer,
        user_lines(),
        sys.stdout,
        sys.stderr,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        echo=not interactive,
        fmt=fmt,
    )


if __name__ == "__main__":
    main()
