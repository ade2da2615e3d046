"""The PPO update: `--ppo_epochs` passes over a rollout, each a fresh permutation cut into minibatches,
each minibatch into micro-batches of `--per_device_training_batch_size` accumulated into ONE optimizer
step of the actor and one of the critic (docs/ppo-fidelity.md item 19; no critic for the critic-free estimators).
The policy loss reduces its tokens by --loss_agg, clips the ratio to [1 - --clip_ratio_low, 1 + --clip_ratio_high]
(optionally dual-clipped, or per answer with --ratio_level sequence: GSPO) and with --mask_truncated_answers
leaves out answers cut off without EOS (DAPO); --kl_in_loss adds the KL to the reference as a loss term.
Optional PPO-ptx LM loss and EMA (item 20).

A non-finite actor or critic loss stops the run before its backward (common.training.checkpoint.check_finite_loss),
or with --skip_nonfinite_steps skips that engine's micro-batch and counts it (which shifts that engine's
accumulation boundary by one micro-batch, as in stages 1-2). A non-finite gradient norm always stops.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterator

import torch

from common.models.forward import causal_lm_loss, position_ids_from_mask, response_logits
from common.rl_math import (
    entropy_from_logits,
    kl_loss,
    logprobs_from_logits,
    masked_mean,
    policy_loss,
    response_positions,
    value_loss,
)
from common.training.checkpoint import check_finite_grad_norm, check_finite_loss
from step3_rlhf.engines import Engines, ema_update
from step3_rlhf.experience import Rollout


def minibatch_schedule(
    n: int, minibatch_size: int, micro_batch_size: int, epochs: int, generator: torch.Generator
) -> list[list[torch.Tensor]]:
    """Index plan of a PPO update: a list of minibatches (one optimizer step each), each a list of
    micro-batch index tensors. Every sample appears exactly once per epoch; len = epochs * n / minibatch."""
    if n % minibatch_size or minibatch_size % micro_batch_size:
        raise ValueError(
            f"rollout {n} / minibatch {minibatch_size} / micro-batch {micro_batch_size} must divide"
        )
    plan = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, minibatch_size):
            mb = perm[start : start + minibatch_size]
            plan.append(list(mb.split(micro_batch_size)))
    return plan


class PPOTrainer:
    """Runs the actor and critic updates on a Rollout; returns averaged statistics."""

    def __init__(
        self, engines: Engines, args: argparse.Namespace, ptx_batches: Iterator | None, zero3_actor: bool
    ):
        self.engines = engines
        self.args = args
        self.ptx_batches = ptx_batches
        self.zero3_actor = zero3_actor
        self.generator = torch.Generator().manual_seed(args.seed)  # same plan on every rank
        self.skipped: dict[str, int] = {"actor": 0, "critic": 0}  # micro-batches skipped (non-finite loss)
        self.iteration = 0  # the PPO iteration being trained (1-based), for messages

    def _finite(self, loss: torch.Tensor, model: str) -> bool:
        ok = check_finite_loss(
            loss, stage="ppo", step=self.iteration, name=f"{model} loss", skip=self.args.skip_nonfinite_steps
        )
        self.skipped[model] += not ok
        return ok

    def actor_step(self, mb: Rollout) -> dict[str, torch.Tensor]:
        args = self.args
        logits = response_logits(self.engines.actor, mb.seq, mb.attention_mask, mb.prompt_len)
        logp = logprobs_from_logits(logits, mb.seq[:, mb.prompt_len :], args.temperature)
        agg = {"loss_agg": args.loss_agg, "norm_length": args.max_answer_seq_len}
        pg_mask = mb.action_mask
        if args.mask_truncated_answers:  # DAPO's overlong filtering: no policy gradient from a cut-off answer
            pg_mask = mb.action_mask * mb.ends_with_eos[:, None].to(mb.action_mask.dtype)
        if pg_mask.any():
            pg_loss, stats = policy_loss(
                logp, mb.logprobs, mb.advantages, pg_mask, args.clip_ratio_low, **agg,
                clip_eps_high=args.clip_ratio_high, dual_clip=args.dual_clip, ratio_level=args.ratio_level,
            )  # fmt: skip
        else:  # every answer of this micro-batch was cut off: only the other terms train
            pg_loss, stats = (logp * 0).sum(), {}
        entropy = masked_mean(entropy_from_logits(logits, args.temperature), mb.action_mask)
        loss = pg_loss - args.entropy_coef * entropy
        stats = {**stats, "policy_loss": pg_loss.detach(), "entropy": entropy.detach()}
        if args.kl_in_loss:  # GRPO's KL term, in place of the KL penalty in the reward
            kl = kl_loss(logp, mb.ref_logprobs, mb.action_mask, args.kl_loss_estimator, **agg)
            loss = loss + args.kl_loss_coef * kl
            stats["kl_loss"] = kl.detach()
        if self.ptx_batches is not None:
            ptx = next(self.ptx_batches)
            dev = mb.seq.device
            ptx_ids, ptx_mask = ptx["input_ids"].to(dev), ptx["attention_mask"].to(dev)
            ptx_out = self.engines.actor(
                input_ids=ptx_ids,
                attention_mask=ptx_mask,
                position_ids=position_ids_from_mask(ptx_mask),
                use_cache=False,
            )
            ptx_loss = causal_lm_loss(ptx_out.logits, ptx["labels"].to(dev))
            loss = loss + args.unsup_coef * ptx_loss
            stats["ptx_loss"] = ptx_loss.detach()
        if not self._finite(loss, "actor"):
            return {}
        self.engines.actor.backward(loss)
        self.engines.actor.step()
        return stats

    def critic_step(self, mb: Rollout) -> dict[str, torch.Tensor]:
        values = response_positions(self.engines.critic(mb.seq, mb.attention_mask).values, mb.prompt_len)
        loss, stats = value_loss(values, mb.values, mb.returns, mb.action_mask, self.args.cliprange_value)
        if not self._finite(loss, "critic"):
            return {}
        self.engines.critic.backward(loss)
        self.engines.critic.step()
        return {"value_loss": loss.detach(), "value_clipfrac": stats["clipfrac"]}

    def train(self, rollout: Rollout, iteration: int = 0) -> dict[str, float]:
        """PPO epochs over `rollout` (iteration: the 1-based PPO iteration, for messages). Returns the
        mean of each statistic over the micro-batches that produced it, and the optimizer steps taken."""
        args = self.args
        self.iteration = iteration
        micro = args.per_device_training_batch_size
        plan = minibatch_schedule(
            len(rollout), micro * args.gradient_accumulation_steps, micro, args.ppo_epochs, self.generator
        )
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for minibatch in plan:
            for idx in minibatch:  # gradient accumulation: the engines step only at the boundary
                mb = rollout.select(idx)
                stats = self.actor_step(mb)  # the actor first, then the critic (the order of their checks)
                if self.engines.critic is not None:
                    stats.update(self.critic_step(mb))
                for k, v in stats.items():
                    sums[k] += float(v)
                    counts[k] += 1
            for name, engine in (("actor", self.engines.actor), ("critic", self.engines.critic)):
                if engine is not None:
                    check_finite_grad_norm(engine, stage=f"ppo {name}", step=iteration)
            if self.engines.ema is not None:
                ema_update(self.engines.ema, self.engines.actor, args.ema_beta, self.zero3_actor)
        return {k: v / counts[k] for k, v in sums.items()} | {"optimizer_steps": len(plan)}
