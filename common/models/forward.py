"""Forwards shared by the stages: position ids from the attention mask, logits of the response positions
only, and the causal-LM loss.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B, L) positions counting real tokens only, so padding on either side
    leaves absolute-position models (GPT-2, OPT) unchanged. Pads get position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_len: int
) -> torch.Tensor:
    """Run a causal LM (engine, peft or plain model) on prompt+response and return only the logits that
    predict the response: (B, L - C, V), equal to `rl_math.response_positions(model(...).logits, C)`.

    input_ids and attention_mask (B, L); the prompt is the first C = `context_len` positions. Models that
    take `logits_to_keep` (transformers' causal LMs) apply the vocabulary projection to the last L - C + 1
    positions only: for prompt 256 / answer 256 that halves the largest activation of the PPO forwards
    and drops the LM head's work over the prompt. Other models compute all positions and are sliced.
    The logits keep the model's dtype (bf16 under --dtype bf16, to spare memory): `rl_math`'s log-probs
    and entropy upcast them to float32 before the log-softmax.
    """
    length = input_ids.shape[1]
    if not 1 <= context_len < length:
        raise ValueError(f"response_logits: context_len must be in [1, {length - 1}], got {context_len}")
    kw = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "use_cache": False,
    }
    keep = length - context_len + 1  # positions C-1 .. L-1; the last one predicts past the sequence
    if _takes_logits_to_keep(model):
        kw["logits_to_keep"] = keep
    logits = model(**kw).logits
    if logits.shape[1] == keep:
        return logits[:, :-1]
    if logits.shape[1] == length:  # the model accepted the argument but ignored it
        return logits[:, context_len - 1 : length - 1]
    raise RuntimeError(f"response_logits: the model returned {logits.shape[1]} positions for {length} tokens")


def _takes_logits_to_keep(model: nn.Module) -> bool:
    model = unwrap_engine(model)
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32. logits (B, L, V), labels (B, L) with -100 = ignore."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100
    )


def unwrap_engine(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DeepSpeed engine -> model
