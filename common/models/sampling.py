"""One way to sample answers from a causal LM: PPO's rollouts, the critic-free groups, the reward model's
normalisation sample, the held-out evaluations of stage 3 and DPO, `chat.py` and `prompt_eval.py` all call
`sample_answers`, so they cannot drift apart.

What it guarantees (docs/ppo-fidelity.md items 4, 5):
- the answers are drawn with exactly the given settings: a model's own `generation_config.json` is set aside
  for the call, so its repetition penalty, top-k or minimum length (Qwen2.5-Instruct ships a repetition
  penalty of 1.05) cannot make a policy's samples disagree with the log-probs PPO computes from
  `logits / temperature`, or make two callers sample differently;
- no position ids are passed: `generate` derives them from the attention mask of left-padded prompts;
- embedding rows past the tokenizer (vocabularies padded to a multiple of 64) are never sampled;
- everything after an answer's first EOS is padding and masked out; the EOS itself is kept.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from common.rl_math import response_mask


@dataclass(frozen=True)
class SamplingSettings:
    """How to draw an answer. temperature 0 (or do_sample False) is greedy, or beam search with num_beams > 1;
    otherwise sampling at `temperature` with top-k (0 = off) and nucleus (1.0 = off) filtering."""

    max_new_tokens: int
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    num_beams: int = 1
    use_cache: bool = True

    @property
    def sampling(self) -> bool:
        return self.do_sample and self.temperature > 0


@dataclass
class Samples:
    """Answers to one batch of left-padded prompts (P prompt columns, R answer columns)."""

    seq: torch.Tensor  # (B, P + R) prompt + answer, pad after each answer's first EOS
    attention_mask: torch.Tensor  # (B, P + R) the prompt's mask, then action_mask
    action_mask: torch.Tensor  # (B, R) 1 on the answer's tokens up to and including its first EOS
    ends: torch.Tensor  # (B,) bool: the answer ended with EOS within max_new_tokens
    prompt_len: int  # P

    @property
    def answers(self) -> torch.Tensor:
        """(B, R) the answer columns of `seq`."""
        return self.seq[:, self.prompt_len :]


def padded_vocab_rows(model: nn.Module, tokenizer: Any) -> list[int]:
    """Ids of the output-embedding rows past the tokenizer's vocabulary: rows added to round the embedding
    matrix up (pad_to_multiple_of), which are not tokens and must never be sampled."""
    embeddings = model.get_output_embeddings()
    if embeddings is None:
        return []
    # Under ZeRO-3 a partitioned weight is empty; its full shape is in ds_shape.
    rows = getattr(embeddings.weight, "ds_shape", embeddings.weight.shape)[0]
    return list(range(len(tokenizer), rows))


def generation_config(settings: SamplingSettings, tokenizer: Any, suppress: list[int]) -> GenerationConfig:
    """The complete GenerationConfig of `settings` (every knob set, so no model default leaks in)."""
    sampling = settings.sampling
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sampling,
        temperature=settings.temperature if sampling else None,
        top_k=settings.top_k if sampling else None,
        top_p=settings.top_p if sampling else None,
        num_beams=settings.num_beams,
        repetition_penalty=1.0,
        use_cache=settings.use_cache,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=suppress or None,
    )


def _hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DeepSpeed engine, or `model` itself. (DeepSpeed is not imported here:
    chat.py and prompt_eval.py run without it, and a model cannot be an engine unless it was imported.)"""
    deepspeed = sys.modules.get("deepspeed")
    return model.module if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine) else model


@torch.no_grad()
def sample_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: SamplingSettings,
    *,
    synced_gpus: bool = False,
    **generate_kwargs: Any,
) -> Samples:
    """Answer (B, P) left-padded `prompts` (mask (B, P)) under `settings`. `model` is a Hugging Face model or
    a DeepSpeed engine holding one: the engine's eval() / train() switch DeepSpeed's hybrid engine into and
    out of inference mode, and its module's `generate` is the one the hybrid engine patches (on the CPU, or
    for architectures it has no kernels for, the model's own). synced_gpus: every rank steps until the
    longest answer of any rank is done (ZeRO-3 without a gathered copy). generate_kwargs (a streamer, stop
    strings) go to `generate` as they are. The model is left in the mode it was in."""
    hf_model = _hf_model(model)
    if generate_kwargs.get("stop_strings"):
        generate_kwargs["tokenizer"] = tokenizer  # generate matches stop strings on decoded text
    was_training = model.training
    model.eval()
    config = generation_config(settings, tokenizer, padded_vocab_rows(hf_model, tokenizer))
    own_defaults = hf_model.generation_config
    hf_model.generation_config = GenerationConfig()
    try:
        seq = hf_model.generate(
            input_ids=prompts,
            attention_mask=prompt_mask,
            generation_config=config,
            synced_gpus=synced_gpus,
            **generate_kwargs,
        )
    finally:
        hf_model.generation_config = own_defaults
        model.train(was_training)
    prompt_len = prompts.shape[1]
    if seq.shape[1] == prompt_len:  # cannot happen with max_new_tokens >= 1
        raise RuntimeError("generate returned no new tokens")
    action_mask, ends = response_mask(seq[:, prompt_len:], tokenizer.eos_token_id)
    seq[:, prompt_len:] = torch.where(action_mask.bool(), seq[:, prompt_len:], tokenizer.pad_token_id)
    attention_mask = torch.cat([prompt_mask.long(), action_mask.long()], dim=1)
    return Samples(seq, attention_mask, action_mask, ends, prompt_len)


def decode_answer(
    tokenizer: Any,
    seq: torch.Tensor,
    mask: torch.Tensor,
    ends: bool,
    prompt_len: int,
    prompt_text: str | None = None,
) -> tuple[str, list[int], str]:
    """One sampled row as a scorer sees it (the gold of held-out answers, a --reward_fn in training): seq
    (P + R,) prompt + answer, mask (R,) over the answer, ends: it stopped at EOS -> (prompt text, answer
    token ids without the EOS, answer text), both texts decoded without special tokens. `prompt_text`, the
    row's original prompt, replaces the decoded one (chat-template data: `seq` holds the rendering)."""
    response = seq[prompt_len:][mask.bool()]
    tokens = response[:-1] if ends else response
    prompt = prompt_text or tokenizer.decode(seq[:prompt_len], skip_special_tokens=True)
    return prompt, tokens.tolist(), tokenizer.decode(tokens, skip_special_tokens=True)
