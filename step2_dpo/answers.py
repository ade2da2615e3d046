"""Sampled answers of the DPO policy to held-out prompts, as stage 3 samples its policy: the same prompts,
temperature (no top-k / top-p), answer budget and seed, and the KL of each answer to the reference measured
the same way (per-sequence sum of k1 = log pi - log pi_ref at the sampling temperature), so that the gold
figures of a DPO policy and a PPO policy trained from one stage-1 model compare directly."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from common import dist
from common.heldout import SampledAnswers
from common.model import response_logits
from common.rl_math import kl_penalty, logprobs_from_logits, masked_sum, response_mask
from step2_dpo.pairs import Reference


def answer_sampler(
    policy: nn.Module, reference: Reference, tokenizer, args, zero3: bool
) -> Callable[[torch.Tensor, torch.Tensor, list[dict] | None, list[str] | None], SampledAnswers]:
    """`sample(prompts (B, P) left-padded, prompt_mask (B, P), extra columns, prompt texts (both unused)) ->
    SampledAnswers` for `common.heldout.evaluate_answers`."""
    eos, pad, t = tokenizer.eos_token_id, tokenizer.pad_token_id, args.temperature

    @torch.no_grad()
    def sample(
        prompts: torch.Tensor,
        prompt_mask: torch.Tensor,
        extra: list[dict] | None = None,
        texts: list[str] | None = None,
    ) -> SampledAnswers:
        prompt_len = prompts.shape[1]
        policy.eval()
        seq = policy.module.generate(
            input_ids=prompts,
            attention_mask=prompt_mask,
            max_new_tokens=args.max_answer_seq_len,
            do_sample=True,
            temperature=t,
            top_k=0,
            top_p=1.0,
            eos_token_id=eos,
            pad_token_id=pad,
            synced_gpus=zero3 and dist.get_world_size() > 1,  # ZeRO-3 ranks step together to the longest
        )
        mask, ends = response_mask(seq[:, prompt_len:], eos)
        seq[:, prompt_len:] = torch.where(mask.bool(), seq[:, prompt_len:], pad)
        attention_mask = torch.cat([prompt_mask.long(), mask], dim=1)
        answer = seq[:, prompt_len:]
        logp = logprobs_from_logits(response_logits(policy, seq, attention_mask, prompt_len), answer, t)
        with reference.model() as ref:
            ref_logp = logprobs_from_logits(response_logits(ref, seq, attention_mask, prompt_len), answer, t)
        policy.train()
        kl = masked_sum(kl_penalty(logp, ref_logp, "k1"), mask, dim=1)
        return SampledAnswers(seq=seq, mask=mask, ends=ends, kl=kl)

    return sample
