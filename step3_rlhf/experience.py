"""Experience making: sample responses, then score them with all four models in batched forwards.

For one batch of left-padded prompts (B, P):
  1. the actor samples responses (hybrid engine or the model's own `generate`); under ZeRO-3 its weights
     are gathered once per batch when a full copy fits (otherwise at every decode step, with `synced_gpus`);
     everything after the first EOS is masked, the EOS itself kept (items 5, 1);
  2. one forward each of actor, reference, critic and reward model over prompt + response with
     attention mask and explicit position ids (item 4): temperature-scaled log-probs of the response
     tokens (items 6-7), values at the same positions (item 13), the normalised reward-model score at
     the last valid token (item 9);
  3. optional missing-EOS penalty (item 8), per-token rewards = -beta * KL + clipped score at the last
     token (item 14), GAE advantages and returns (item 16), whitened advantages (item 17).
The math lives in common/rl_math.py; this module only moves tensors between models and those functions.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from common import dist
from common.model import response_logits
from common.rl_math import (
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_whiten,
    response_mask,
    response_positions,
    shape_rewards,
)
from step3_rlhf.engines import (
    Engines,
    gathered_copy_fits,
    gathered_for_generation,
    has_inference_kernels,
)


@dataclass
class Rollout:
    """A batch of experience. B sequences of prompt (left-padded to P) + response (right-padded to R).

    seq, attention_mask: (B, P + R); action_mask and every per-token tensor: (B, R); scores: (B,).
    """

    seq: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor
    ends_with_eos: torch.Tensor
    prompt_len: int

    def select(self, index: torch.Tensor) -> Rollout:
        """Rows `index`, trimmed to the longest valid response among them."""
        width = int(self.action_mask[index].sum(1).max().item())
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not torch.is_tensor(v):
                out[f.name] = v
            elif v.dim() == 1:
                out[f.name] = v[index]
            elif f.name in ("seq", "attention_mask"):
                out[f.name] = v[index, : self.prompt_len + width]
            else:
                out[f.name] = v[index, :width]
        return Rollout(**out)

    def __len__(self) -> int:
        return self.seq.shape[0]


def _pad_right(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[1]), value=value)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts of different prompt widths P and response lengths R: prompts are left-padded to the
    widest P (position ids come from the mask, so this changes no number), responses right-padded."""
    if len(parts) == 1:
        return parts[0]
    prompt_len = max(p.prompt_len for p in parts)
    width = max(p.action_mask.shape[1] for p in parts)
    out: dict = {"prompt_len": prompt_len}
    for f in fields(Rollout):
        if f.name == "prompt_len":
            continue
        vals = [getattr(p, f.name) for p in parts]
        if vals[0].dim() == 1:
            out[f.name] = torch.cat(vals)
        elif f.name in ("seq", "attention_mask"):
            value = pad_id if f.name == "seq" else 0
            out[f.name] = torch.cat(
                [
                    F.pad(
                        v,
                        (prompt_len - p.prompt_len, p.prompt_len + width - v.shape[1]),
                        value=value,
                    )
                    for v, p in zip(vals, parts, strict=True)
                ]
            )
        else:
            out[f.name] = torch.cat([_pad_right(v, width, 0) for v in vals])
    return Rollout(**out)


class ExperienceMaker:
    """Turns prompt batches into `Rollout`s with the engines and the PPO settings in `args`."""

    def __init__(self, engines: Engines, tokenizer, args: argparse.Namespace, kl_ctl, zero3_actor: bool):
        self.e = engines
        self.tokenizer = tokenizer
        self.args = args
        self.kl_ctl = kl_ctl
        self.zero3_actor = zero3_actor
        self.seconds: dict[str, float] = defaultdict(float)  # wall time per phase, reset by the caller
        if engines.hybrid:
            dist.print_rank0(
                "[ppo] hybrid engine: "
                + (
                    "DeepSpeed inference kernels"
                    if has_inference_kernels(engines.actor)
                    else "no kernels for this model/device, model's own generate()"
                )
            )

    def gather_actor(self) -> bool:
        """Whether this generate() call gathers the ZeRO-3 actor once (the same answer on every rank):
        --gather_actor_for_generation, by default when the full copy fits (see gathered_copy_fits). Never
        with the hybrid engine's kernels, which gather the layers themselves."""
        if not self.zero3_actor or has_inference_kernels(self.e.actor):
            return False
        choice = self.args.gather_actor_for_generation
        return gathered_copy_fits(self.e.actor) if choice is None else choice

    @contextmanager
    def _timed(self, phase: str):
        """Accumulate the wall time of a phase (synchronising the GPU so the time is the work's)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[phase] += time.perf_counter() - start

    # -------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """(B, P) left-padded prompts -> (B, P + R) sequences, R <= max_answer_seq_len. No position_ids are
        passed: generate derives them from the attention mask (item 4)."""
        a = self.args
        self.e.actor.eval()
        # With the hybrid engine and a model it has kernels for, DeepSpeed patches `module.generate` with its
        # inference path; otherwise (CPU, unsupported architectures) this is the model's own generate().
        gather = self.gather_actor()
        # Without the gather, every decode step all-gathers partitions: all ranks step until the longest is done.
        synced_gpus = self.zero3_actor and dist.get_world_size() > 1 and not gather
        with self._timed("generation"), gathered_for_generation(self.e.actor, gather):
            seq = self.e.actor.module.generate(
                input_ids=prompts,
                attention_mask=prompt_mask,
                max_new_tokens=a.max_answer_seq_len,
                do_sample=a.do_sample,
                temperature=a.temperature if a.do_sample else None,
                top_k=a.top_k if a.do_sample else None,
                top_p=a.top_p if a.do_sample else None,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                synced_gpus=synced_gpus,
                use_cache=a.generation_use_cache,
            )
        self.e.actor.train()
        if seq.shape[1] == prompts.shape[1]:  # cannot happen with max_new_tokens >= 1
            raise RuntimeError("generate returned no new tokens")
        return seq

    # -------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(
        self, seq: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int
    ) -> dict[str, torch.Tensor]:
        """Actor/reference log-probs, critic values (B, R) and normalised reward scores (B,)."""
        t = self.args.temperature
        answer = seq[:, prompt_len:]
        # Train mode is harmless here (dropout is off in every engine) and keeps the hybrid engine in training mode.
        with self._timed("actor_forward"):
            logits = response_logits(self.e.actor, seq, attention_mask, prompt_len)
            logprobs = logprobs_from_logits(logits, answer, t)
        with self._timed("reference_forward"):
            logits = response_logits(self.e.ref, seq, attention_mask, prompt_len)
            ref_logprobs = logprobs_from_logits(logits, answer, t)
        del logits
        with self._timed("critic_forward"):
            values = response_positions(self.e.critic(seq, attention_mask).values, prompt_len)
        with self._timed("reward_forward"):
            scores = self.e.reward(seq, attention_mask, normalize=True).scores
        return {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values, "scores": scores}

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Sample responses -> (seq (B, P+R) with pad after the first EOS, attention_mask (B, P+R),
        action_mask (B, R), ends_with_eos (B,))."""
        prompt_len = prompts.shape[1]
        seq = self.generate(prompts, prompt_mask)
        action_mask, ends = response_mask(seq[:, prompt_len:], self.tokenizer.eos_token_id)
        seq[:, prompt_len:] = torch.where(
            action_mask.bool(), seq[:, prompt_len:], self.tokenizer.pad_token_id
        )
        attention_mask = torch.cat([prompt_mask.long(), action_mask], dim=1)
        return seq, attention_mask, action_mask, ends

    @torch.no_grad()
    def make(self, prompts: torch.Tensor, prompt_mask: torch.Tensor) -> Rollout:
        """One generation batch -> a Rollout with log-probs, values, KL and scores (rewards, advantages and
        returns are filled in by `shape`, over the whole rollout)."""
        a = self.args
        prompt_len = prompts.shape[1]
        seq, attention_mask, action_mask, ends = self.sample(prompts, prompt_mask)
        s = self.score(seq, attention_mask, prompt_len)
        scores = s["scores"].float()
        if a.missing_eos_penalty is not None:
            scores = torch.where(ends, scores, torch.full_like(scores, a.missing_eos_penalty))
        kl = kl_penalty(s["logprobs"], s["ref_logprobs"], kind=a.kl_estimator, clamp=a.kl_clamp)
        zeros = torch.zeros_like(kl)
        return Rollout(
            seq=seq,
            attention_mask=attention_mask,
            action_mask=action_mask,
            logprobs=s["logprobs"],
            ref_logprobs=s["ref_logprobs"],
            values=s["values"],
            kl=kl,
            rewards=zeros,
            advantages=zeros,
            returns=zeros,
            scores=scores,
            ends_with_eos=ends,
            prompt_len=prompt_len,
        )

    def shape(self, r: Rollout) -> Rollout:
        """Per-token rewards (-beta * KL + clipped score at the last token), optional reward whitening, GAE,
        advantage whitening: all over the whole rollout of this rank (items 14, 16, 17)."""
        a = self.args
        rewards = shape_rewards(
            r.scores, r.kl, r.action_mask, self.kl_ctl.value, clip_score=a.clip_reward_value
        )
        if a.whiten_rewards:
            rewards = masked_whiten(rewards, r.action_mask, shift_mean=False)
        advantages, returns = gae(rewards, r.values, r.action_mask, a.gamma, a.lam)
        if a.whiten_advantages:
            advantages = masked_whiten(advantages, r.action_mask, shift_mean=True)
        r.rewards, r.advantages, r.returns = rewards, advantages, returns
        return r

    def make_rollout(self, prompt_batches: list[dict[str, torch.Tensor]]) -> Rollout:
        """Several generation batches -> one shaped Rollout."""
        parts = [self.make(b["input_ids"], b["attention_mask"]) for b in prompt_batches]
        return self.shape(concat_rollouts(parts, self.tokenizer.pad_token_id))
