"""Log-probs and entropy from logits (with the sampling temperature), the response slice of a sequence,
and the response masks.
(docs/ppo-fidelity.md items 6-7).
"""

from __future__ import annotations

import torch

from common.rl_math.masked import _check_rows_nonempty, _upcast


def _scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _upcast(logits) / temperature


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature) at `labels`: logits (B, T, V), labels (B, T) int -> (B, T).

    The same temperature as sampling must be used everywhere (item 6), or KL != 0 and ratio != 1 before
    the first update.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logprobs_from_logits: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree "
            "(expected logits (B, T, V) and labels (B, T))"
        )
    z = _scaled_logits(logits, temperature)
    picked = torch.gather(z, dim=-1, index=labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature): logits (B, T, V) -> (B, T), in nats."""
    z = _scaled_logits(logits, temperature)
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def response_positions(x: torch.Tensor, context_len: int) -> torch.Tensor:
    """Slice a full-sequence tensor (B, L, ...) to the positions that predict the response: [C-1 : L-1].

    Position C-1 + t of a causal LM's output sees tokens 0..C-1+t and predicts response token t, so the
    result (B, L - C, ...) is aligned with the response labels input_ids[:, C:] (item 7). Use it for
    values too: V(s_t) is read at the same positions as the log-probs (item 13).
    """
    length = x.shape[1]
    if not 1 <= context_len < length:
        raise ValueError(f"response_positions: context_len must be in [1, {length - 1}], got {context_len}")
    return x[:, context_len - 1 : length - 1]


def response_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, context_len: int, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs of the response tokens from full-sequence logits.

    logits (B, L, V) of prompt+response, input_ids (B, L), prompt (context) length C -> (B, L - C), where
    entry t is log pi(input_ids[:, C + t] | input_ids[:, :C + t]) at the given temperature.
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"response_logprobs: logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} disagree "
            "(expected logits (B, L, V) and input_ids (B, L))"
        )
    return logprobs_from_logits(
        response_positions(logits, context_len), input_ids[:, context_len:], temperature=temperature
    )


def response_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) sampled tokens -> (mask (B, R) long, ends_with_eos (B,) bool): mask is 1 up to and including
    each row's first EOS (the whole row when it has none); what follows the first EOS is not the answer."""
    is_eos = (responses == eos_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).long(), is_eos.bool().any(dim=1)


def pair_response_mask(attention_mask: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
    """Mask over the next-token targets input_ids[:, 1:] of right-padded prompt + response rows: (B, L)
    attention mask and (B,) prompt lengths -> (B, L - 1), 1 where target j + 1 is a response token (at or
    after its row's prompt length and not padding). Pairs with `logprobs_from_logits(logits[:, :-1],
    input_ids[:, 1:])`: summing the masked log-probs gives log pi(response | prompt)."""
    positions = torch.arange(1, attention_mask.shape[1], device=attention_mask.device)
    after_prompt = positions[None, :] >= prompt_lens.to(attention_mask.device)[:, None]
    return (after_prompt & attention_mask[:, 1:].bool()).long()


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid position of each row: mask (B, T) -> (B,) long.

    Rows may have leading zeros as well as trailing ones. Raises ValueError naming a row with no valid
    position.
    """
    if mask.dim() != 2:
        raise ValueError(f"last_valid_index: mask must be (B, T), got shape {tuple(mask.shape)}")
    _check_rows_nonempty("last_valid_index", mask)
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.bool() * positions).max(dim=1).values - 1
