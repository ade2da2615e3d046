"""Sampled answers of the DPO policy to held-out prompts, as stage 3 samples its policy: the same prompts,
temperature (no top-k / top-p), answer budget and seed, and the KL of each answer to the reference measured
the same way (per-sequence sum of k1 = log pi - log pi_ref at the sampling temperature; none for a
reference-free loss), so that the gold figures of a DPO policy and a PPO policy trained from one stage-1 model
compare directly."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from common import dist
from common.evaluation.heldout import SampledAnswers
from common.models.forward import response_logits
from common.models.sampling import SamplingSettings, sample_answers
from common.rl_math import logprobs_from_logits, sequence_kl
from step2_dpo.pairs import Reference


def answer_sampler(
    policy: nn.Module, reference: Reference | None, tokenizer, args, zero3: bool
) -> Callable[[torch.Tensor, torch.Tensor, list[dict] | None, list[str] | None], SampledAnswers]:
    """`sample(prompts (B, P) left-padded, prompt_mask (B, P), extra columns, prompt texts (both unused)) ->
    SampledAnswers` for `common.evaluation.heldout.evaluate_answers`."""
    settings = SamplingSettings(max_new_tokens=args.max_answer_seq_len, temperature=args.temperature)
    t = args.temperature

    @torch.no_grad()
    def sample(
        prompts: torch.Tensor,
        prompt_mask: torch.Tensor,
        extra: list[dict] | None = None,
        texts: list[str] | None = None,
    ) -> SampledAnswers:
        policy.eval()
        # ZeRO-3 ranks step together to the longest answer.
        answers = sample_answers(
            policy, tokenizer, prompts, prompt_mask, settings, synced_gpus=zero3 and dist.get_world_size() > 1
        )
        seq, attention_mask, prompt_len = answers.seq, answers.attention_mask, answers.prompt_len
        kl = None
        if reference is not None:
            logp = logprobs_from_logits(
                response_logits(policy, seq, attention_mask, prompt_len), answers.answers, t
            )
            with reference.model() as ref:
                ref_logp = logprobs_from_logits(
                    response_logits(ref, seq, attention_mask, prompt_len), answers.answers, t
                )
            kl = sequence_kl(logp, ref_logp, answers.action_mask, "k1")
        policy.train()
        return SampledAnswers(seq=seq, mask=answers.action_mask, ends=answers.ends, kl=kl)

    return sample
