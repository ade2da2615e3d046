"""Rendering rm-static conversations with a model's own chat template (`--apply_chat_template`).

The data layer's prompts are rm-static text: "\\n\\nHuman: Q1\\n\\nAssistant: A1\\n\\nHuman: Q2\\n\\nAssistant:".
With a chat template they become messages [user Q1, assistant A1, user Q2], rendered by the tokenizer's
template with the generation prompt (SmolLM2 / Qwen / ChatML: "<|im_start|>user\\nQ2<|im_end|>\\n
<|im_start|>assistant\\n"). A response is the assistant message's content (surrounding whitespace stripped)
followed by the template's end-of-turn token, which is the tokenizer's EOS: SFT learns to end its turn,
the reward model scores the conversation as the template renders it (up to the end of the turn), and
generation stops there.

`ChatFormat.for_tokenizer` checks, once, that the template renders a conversation as prompt + content +
end-of-turn (the property the split into prompt ids and response ids relies on) and finds the end-of-turn
token. `use_end_of_turn_as_eos` makes that token the tokenizer's EOS where the two differ (Llama-3 style
tokenizers whose EOS is "<|end_of_text|>" but whose turns end in "<|eot_id|>").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.training.output_dir import RUN_MARKER

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}
_PROBE_Q, _PROBE_A = "PROBE-QUESTION-1", "PROBE-ANSWER-2"


class ChatTemplateError(ValueError):
    """A tokenizer without a usable chat template, or a prompt that is not an rm-static conversation."""


def rm_static_messages(prompt: str) -> list[dict[str, str]]:
    """rm-static prompt text -> chat messages, ending with the user turn the answer responds to.

    "\\n\\nHuman: Q1\\n\\nAssistant: A1\\n\\nHuman: Q2\\n\\nAssistant:" -> [{"role": "user", "content": "Q1"},
    {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]. Raises ChatTemplateError for
    text that is not Human/Assistant turns alternating from Human and ending in an empty Assistant turn."""
    stripped = prompt.strip()
    if not stripped.startswith("Human:") or not prompt.rstrip().endswith("Assistant:"):
        raise ChatTemplateError(
            "not an rm-static prompt (expected '\\n\\nHuman: ...\\n\\nAssistant:'): " + repr(prompt[:80])
        )
    parts = _TURN.split(stripped)  # ["", role, text, role, text, ...]
    roles, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    if parts[0].strip() or roles[-1] != "Assistant" or texts[-1]:
        raise ChatTemplateError(f"not an rm-static prompt: {prompt[:80]!r}")
    roles, texts = roles[:-1], texts[:-1]
    for i, role in enumerate(roles):
        if role != ("Human" if i % 2 == 0 else "Assistant"):
            raise ChatTemplateError(f"turns must alternate Human/Assistant from Human: {prompt[:80]!r}")
    return [{"role": _ROLES[r], "content": t} for r, t in zip(roles, texts, strict=True)]


@dataclass(frozen=True)
class ChatFormat:
    """How one tokenizer's chat template turns rm-static rows into text (see the module docstring)."""

    tokenizer: Any
    end_of_turn: str  # the special token that closes an assistant turn

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, name: str = "the tokenizer") -> ChatFormat:
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"--apply_chat_template: {name} has no chat template (tokenizer_config.json / "
                "chat_template.jinja); drop the flag to train on the plain rm-static text"
            )
        conversation = [{"role": "user", "content": _PROBE_Q}]
        prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            conversation + [{"role": "assistant", "content": _PROBE_A}], tokenize=False
        )
        if not full.startswith(prompt + _PROBE_A):
            raise ChatTemplateError(
                f"--apply_chat_template: the chat template of {name} does not render a conversation as "
                f"prompt + answer + end of turn, so prompt and answer tokens cannot be split: {full!r}"
            )
        suffix = full[len(prompt + _PROBE_A) :]
        specials = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
        end = next((s for s in specials if suffix.startswith(s)), None)
        if end is None:
            raise ChatTemplateError(
                f"--apply_chat_template: the chat template of {name} closes an assistant turn with "
                f"{suffix!r}, which does not start with a special token to stop generation at"
            )
        return cls(tokenizer, end)

    def prompt(self, prompt: str) -> str:
        """Rendered prompt text, ending with the template's generation prompt (special tokens as text)."""
        return self.tokenizer.apply_chat_template(
            rm_static_messages(prompt), tokenize=False, add_generation_prompt=True
        )

    def prompt_pieces(self, prompt: str) -> list[tuple[str, bool]]:
        """The rendered prompt as (piece, is_message_text) in order: the template's text around the
        messages' contents, and the contents themselves (to be encoded as plain text, whatever they hold)."""
        messages = rm_static_messages(prompt)
        marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        rendered = self.tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
        pieces: list[tuple[str, bool]] = []
        for i, part in enumerate(re.split("\ue000(\\d+)\ue001", rendered)):
            if i % 2 == 0:
                if part:
                    pieces.append((part, False))
            else:
                pieces.append((messages[int(part)]["content"], True))
        return pieces

    @staticmethod
    def response(response: str) -> str:
        """The assistant content of a response (the pipeline appends the EOS = end-of-turn id itself)."""
        return response.strip()

    def conversation(self, prompt: str, response: str) -> str:
        """The whole rendered conversation up to and including the end-of-turn token (for display)."""
        return self.prompt(prompt) + self.response(response) + self.end_of_turn


def use_end_of_turn_as_eos(tokenizer: Any, name: str = "the tokenizer") -> ChatFormat:
    """The tokenizer's ChatFormat, after making its end-of-turn token the EOS when they differ (so that
    SFT targets end in it and generation stops at it). Returns the ChatFormat."""
    fmt = ChatFormat.for_tokenizer(tokenizer, name)
    if tokenizer.eos_token != fmt.end_of_turn:
        print(
            f"[chat] {name}: EOS {tokenizer.eos_token!r} -> the chat template's end of turn {fmt.end_of_turn!r}"
        )
        tokenizer.eos_token = fmt.end_of_turn
    return fmt


CHAT_TEMPLATE_MODES = ("auto", "on", "off")


def trained_with_chat_template(path: str) -> bool | None:
    """Whether the stage run that wrote the model directory `path` (or its parent: OUT/ppo/actor) had
    --apply_chat_template; None when `path` is not a stage's output (a hub id, a downloaded model)."""
    for folder in (Path(path), Path(path).parent):
        marker = folder / RUN_MARKER  # a stage's output directory: the command it came from
        if marker.is_file():
            try:
                command = json.loads(marker.read_text()).get("command", [])
            except (OSError, ValueError, AttributeError):
                return None
            return "--apply_chat_template" in command
    return None


def chat_format_for(path: str, tokenizer: Any, mode: str = "auto") -> ChatFormat | None:
    """The ChatFormat to talk to the model at `path` with, or None for the plain rm-static text.

    "on"/"off" force it; "auto" follows how the model was trained (its stage's recorded command) and, for a
    model no stage wrote, uses the chat template when the tokenizer has one. With a format the tokenizer's
    EOS becomes the template's end-of-turn token, as in training."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat template mode {mode!r}: expected one of {CHAT_TEMPLATE_MODES}")
    if mode == "auto":
        trained = trained_with_chat_template(path)
        use = bool(getattr(tokenizer, "chat_template", None)) if trained is None else trained
    else:
        use = mode == "on"
    return use_end_of_turn_as_eos(tokenizer, repr(path)) if use else None
