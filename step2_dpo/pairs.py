"""DPO on preference pairs: the policy's and the reference's log-likelihood of each response, the loss and
its statistics (the formulas are `common.rl_math.preference_loss`), and the metrics over held-out pairs.

A PairCollator batch stacks the chosen rows over the rejected ones ((2B, T), right-padded) with each row's
prompt length ("prompt_lens", (2B,)); a response's log-likelihood is the sum of log pi over its tokens after
the prompt, EOS included (`rl_math.pair_response_mask`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from common import dist
from common.models.forward import position_ids_from_mask
from common.rl_math import logprobs_from_logits, masked_mean, masked_sum, pair_response_mask, preference_loss
from common.training.engines import to_device

# Per-pair statistics, in the order the evaluation sums them.
PAIR_STATS = (
    "loss",
    "accuracy",
    "chosen_reward",
    "rejected_reward",
    "margin",
    "chosen_logp",
    "rejected_logp",
)


class Reference:
    """The frozen reference policy: a frozen engine of its own, or (LoRA with frozen base weights) the
    policy itself with its adapters disabled, which needs no second model."""

    def __init__(self, engine: nn.Module | None = None, adapter_policy: nn.Module | None = None):
        if (engine is None) == (adapter_policy is None):
            raise ValueError("Reference: give a frozen engine or a LoRA policy, not both or neither")
        self.engine, self.adapter_policy = engine, adapter_policy

    @contextmanager
    def model(self) -> Iterator[nn.Module]:
        """The module to call for reference log-probs, inside this context."""
        if self.engine is not None:
            yield self.engine
        else:
            with self.adapter_policy.module.disable_adapter():
                yield self.adapter_policy


def response_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token) of every next-token target (2B, T - 1), and the mask of the response targets."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids_from_mask(batch["attention_mask"]),
        use_cache=False,
    )
    logp = logprobs_from_logits(out.logits[:, :-1], batch["input_ids"][:, 1:])
    return logp, pair_response_mask(batch["attention_mask"], batch["prompt_lens"])


def dpo_loss(
    policy: nn.Module, reference: Reference, batch: dict[str, torch.Tensor], args
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean DPO loss of a batch (plus --sft_loss_coef times the chosen responses' token-mean NLL) and the
    per-pair statistics of PAIR_STATS, each (B,) and detached."""
    logp, mask = response_logps(policy, batch)
    sums = masked_sum(logp, mask, dim=1)
    with torch.no_grad(), reference.model() as ref:
        ref_logp, _ = response_logps(ref, batch)
        ref_sums = masked_sum(ref_logp, mask, dim=1)
    half = sums.shape[0] // 2
    losses, stats = preference_loss(
        sums[:half],
        sums[half:],
        ref_sums[:half],
        ref_sums[half:],
        beta=args.beta,
        loss_type=args.loss_type,
        label_smoothing=args.label_smoothing,
    )
    loss = losses.mean()
    if args.sft_loss_coef:
        loss = loss + args.sft_loss_coef * -masked_mean(logp[:half], mask[:half])
    stats.update(loss=losses.detach(), chosen_logp=sums[:half].detach(), rejected_logp=sums[half:].detach())
    return loss, stats


@torch.no_grad()
def evaluate_pairs(
    policy: nn.Module, reference: Reference, loader, dev: torch.device, args, max_batches: int = 0
) -> dict[str, float]:
    """The means of PAIR_STATS over the held-out pairs (the first `max_batches` batches per rank if > 0),
    summed across ranks, and "pairs", their number. Placeholder rows of the eval loader are not counted."""
    policy.eval()
    sums = torch.zeros(len(PAIR_STATS) + 1, dtype=torch.float64, device=dev)
    for i, (batch, real) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        _, stats = dpo_loss(policy, reference, to_device(batch, dev), args)
        r = real.to(dev)
        sums += torch.stack([*(stats[k][r].double().sum() for k in PAIR_STATS), r.sum().double()])
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(sums)
    policy.train()
    n = max(sums[-1].item(), 1.0)
    return {**{k: sums[j].item() / n for j, k in enumerate(PAIR_STATS)}, "pairs": int(sums[-1].item())}
