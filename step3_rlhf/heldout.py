"""Held-out evaluation of the policy: what PPO did to sampled answers to prompts never trained on.

Stage 3 evaluates before PPO (the stage-1 policy), every `--eval_interval` iterations and after PPO, with the
same sampling seed each time, so that the before/after comparison differs only by the policy. Each
evaluation records
    score               the reward model's (proxy's) mean normalised score: what PPO maximises
    kl                  the mean per-sequence KL of the answers to the reference policy (the x axis of the
                        over-optimisation curve)
    gold_mean, gold_share_<label>, eos_fraction, response_length, repeated_3gram_rate, distinct_2,
    leaked_turn_markers
                        the gold's figures and the reward-hacking measures (common/evaluation/heldout.py)
When the proxy rises while the gold falls, PPO is fooling the reward model. The before and after answers
themselves go to `heldout_answers.jsonl`, one row per prompt, with their proxy and gold scores.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from common.evaluation.heldout import MEASURES, GoldReward, SampledAnswers, evaluate_answers
from common.rl_math import sequence_kl
from step3_rlhf.experience import ExperienceMaker

# TensorBoard Custom Scalars charts of the evaluations (common.training.monitor.Monitor.charts): title -> scalars
HELDOUT_CHARTS = {
    "proxy and gold": ["eval/score", "eval/gold_mean"],
    "measures": [f"eval/{k}" for k in MEASURES],
}


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(
    maker: ExperienceMaker, loader: DataLoader, dev: torch.device, seed: int, gold: GoldReward | None = None
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The statistics of the module docstring over sampled answers to the held-out prompts (the same on
    every rank), and (on rank 0; empty elsewhere) every prompt with its answer, proxy score and gold score,
    in the eval set's order (`common.evaluation.heldout.evaluate_answers`)."""
    args = maker.args

    def sample(
        prompts: torch.Tensor, prompt_mask: torch.Tensor, extra: list[dict] | None, texts: list[str] | None
    ) -> SampledAnswers:
        answers = maker.sample(prompts, prompt_mask)
        seq, attention_mask, prompt_len = answers.seq, answers.attention_mask, answers.prompt_len
        logprobs, ref_logprobs = maker.policy_logprobs(seq, attention_mask, prompt_len)
        kl = sequence_kl(logprobs, ref_logprobs, answers.action_mask, args.kl_estimator, args.kl_clamp)
        scores = maker.reward_scores(seq, attention_mask, prompt_len, extra, texts)
        return SampledAnswers(seq=seq, mask=answers.action_mask, ends=answers.ends, kl=kl, scores=scores)

    return evaluate_answers(sample, loader, dev, seed, maker.tokenizer, gold)
