"""Preference losses: the policy's and the reference's log-likelihood of each response, the loss of
--loss_type and its statistics (the formulas are `common.rl_math`: preference_loss for DPO and IPO, kto_loss,
orpo_loss, simpo_loss), and the metrics over held-out examples.

A PairCollator batch stacks the chosen rows over the rejected ones ((2B, T), right-padded) with each row's
prompt length ("prompt_lens", (2B,)); a response's log-likelihood is the sum of log pi over its tokens after
the prompt, EOS included (`rl_math.pair_response_mask`). KTO reads an UnpairedCollator batch instead: N rows,
each with its prompt length and "desirable" (N,) label (a pair arrives as two rows, common.data)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from common import dist
from common.models.forward import position_ids_from_mask
from common.rl_math import (
    kto_loss,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    orpo_loss,
    pair_response_mask,
    preference_loss,
    simpo_loss,
)
from common.training.engines import to_device

# Per-example statistics, in the order the evaluation sums them: a pair's, or for KTO a row's, whose chosen_*
# values are NaN on undesirable rows and rejected_* values NaN on desirable ones. Each is averaged over the
# examples that have it; the margin is then chosen_reward - rejected_reward.
EXAMPLE_STATS = (
    "loss",
    "accuracy",
    "chosen_reward",
    "rejected_reward",
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
    """log pi(token) of every next-token target (N, T - 1), and the mask of the response targets."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids_from_mask(batch["attention_mask"]),
        use_cache=False,
    )
    logp = logprobs_from_logits(out.logits[:, :-1], batch["input_ids"][:, 1:])
    return logp, pair_response_mask(batch["attention_mask"], batch["prompt_lens"])


def mismatched_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """KTO's KL rows: row i's prompt followed by row (i + 1) mod N's response (the rows are shuffled, so this
    is another prompt's response but where two rows of one prompt happen to be neighbours), cut to the
    batch's width T, right-padded (with id 0: ids under attention_mask 0 are never read). Returns input_ids
    and attention_mask (N, T) and prompt_lens (N,)."""
    ids, attn, prompt_lens = batch["input_ids"], batch["attention_mask"], batch["prompt_lens"]
    n, width = ids.shape
    lengths = attn.sum(1)
    out_ids = torch.zeros_like(ids)
    out_attn = torch.zeros_like(attn)
    for i in range(n):
        j = (i + 1) % n
        p = int(prompt_lens[i])
        response = ids[j, int(prompt_lens[j]) : int(lengths[j])][: width - p]
        row = torch.cat([ids[i, :p], response])
        out_ids[i, : len(row)] = row
        out_attn[i, : len(row)] = 1
    return {"input_ids": out_ids, "attention_mask": out_attn, "prompt_lens": prompt_lens.clone()}


@torch.no_grad()
def kto_kl_estimate(policy: nn.Module, reference: Reference, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KTO's reference point before clamping: the mean over the batch's mismatched rows of log pi(y|x) -
    log pi_ref(y|x) (whole responses), averaged over ranks; 0-dim, no gradient."""
    rows = mismatched_rows(batch)
    logp, mask = response_logps(policy, rows)
    with reference.model() as ref:
        ref_logp, _ = response_logps(ref, rows)
    kl = (masked_sum(logp, mask, dim=1) - masked_sum(ref_logp, mask, dim=1)).float().mean()
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(kl)
        kl = kl / dist.get_world_size()
    return kl


def dpo_loss(
    policy: nn.Module, reference: Reference | None, batch: dict[str, torch.Tensor], args
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss of --loss_type over a batch (plus --sft_loss_coef times the chosen responses' token-mean
    NLL) and the per-example statistics of EXAMPLE_STATS, each detached. `reference` is None for the
    reference-free losses (orpo, simpo)."""
    logp, mask = response_logps(policy, batch)
    sums = masked_sum(logp, mask, dim=1)
    if args.loss_type == "kto":
        losses, stats = kto_rows_loss(policy, reference, batch, sums, args)
        chosen_rows = batch["desirable"]
    else:
        losses, stats = pair_loss(reference, batch, logp, mask, sums, args)
        chosen_rows = torch.arange(sums.shape[0], device=sums.device) < sums.shape[0] // 2
    loss = losses.mean()
    if args.sft_loss_coef:
        loss = loss + args.sft_loss_coef * -masked_mean(logp, mask * chosen_rows[:, None])
    return loss, {"loss": losses.detach(), **{k: stats[k] for k in EXAMPLE_STATS[1:]}}


def pair_loss(
    reference: Reference | None,
    batch: dict[str, torch.Tensor],
    logp: torch.Tensor,
    mask: torch.Tensor,
    sums: torch.Tensor,
    args,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO, IPO, ORPO or SimPO over a pair batch: losses (B,) and the pair statistics (B,)."""
    half = sums.shape[0] // 2
    if args.loss_type in ("orpo", "simpo"):
        means = sums / mask.sum(1).clamp(min=1)
        if args.loss_type == "orpo":
            losses, stats = orpo_loss(means[:half], means[half:], beta=args.beta)
        else:
            losses, stats = simpo_loss(means[:half], means[half:], beta=args.beta, gamma=args.simpo_gamma)
    else:
        with torch.no_grad(), reference.model() as ref:
            ref_logp, _ = response_logps(ref, batch)
            ref_sums = masked_sum(ref_logp, mask, dim=1)
        losses, stats = preference_loss(
            sums[:half],
            sums[half:],
            ref_sums[:half],
            ref_sums[half:],
            beta=args.beta,
            loss_type=args.loss_type,
            label_smoothing=args.label_smoothing,
        )
    return losses, {**stats, "chosen_logp": sums[:half].detach(), "rejected_logp": sums[half:].detach()}


def kto_rows_loss(
    policy: nn.Module, reference: Reference, batch: dict[str, torch.Tensor], sums: torch.Tensor, args
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO over an unpaired batch: losses (N,) and the row statistics (N,): accuracy is 1 where the implicit
    reward beta * r moved the right way from the reference (> 0 on a desirable row, < 0 on an undesirable
    one); the chosen_* values are the desirable rows', the rejected_* values the undesirable rows'."""
    desirable = batch["desirable"]
    with torch.no_grad(), reference.model() as ref:
        ref_logp, mask = response_logps(ref, batch)
        ref_sums = masked_sum(ref_logp, mask, dim=1)
    losses, kto_stats = kto_loss(
        sums,
        ref_sums,
        desirable,
        kto_kl_estimate(policy, reference, batch),
        beta=args.beta,
        desirable_weight=args.desirable_weight,
        undesirable_weight=args.undesirable_weight,
    )
    reward, logp = kto_stats["reward"], sums.detach()
    nan = torch.full_like(reward, float("nan"))
    return losses, {
        "accuracy": torch.where(desirable, reward > 0, reward < 0).to(reward.dtype),
        "chosen_reward": torch.where(desirable, reward, nan),
        "rejected_reward": torch.where(desirable, nan, reward),
        "chosen_logp": torch.where(desirable, logp, nan),
        "rejected_logp": torch.where(desirable, nan, logp),
    }


def mean_stats(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch means of EXAMPLE_STATS (each over the examples that have it) and the margin."""
    means = {k: stats[k].float().nanmean() for k in EXAMPLE_STATS}
    return {**means, "margin": means["chosen_reward"] - means["rejected_reward"]}


@torch.no_grad()
def evaluate_pairs(
    policy: nn.Module, reference: Reference | None, loader, dev: torch.device, args, max_batches: int = 0
) -> dict[str, float]:
    """The means of EXAMPLE_STATS over the held-out examples (the first `max_batches` batches per rank if
    > 0), summed across ranks, the margin, and their number: "pairs", or "rows" for KTO. Placeholder examples
    of the eval loader are not counted."""
    policy.eval()
    sums = torch.zeros(len(EXAMPLE_STATS), dtype=torch.float64, device=dev)
    counts = torch.zeros(len(EXAMPLE_STATS) + 1, dtype=torch.float64, device=dev)  # the last: examples
    for i, (batch, real) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        _, stats = dpo_loss(policy, reference, to_device(batch, dev), args)
        r = real.to(dev)
        values = torch.stack([stats[k][r].double() for k in EXAMPLE_STATS])  # (stats, real examples)
        sums += values.nansum(dim=1)
        counts += torch.cat([(~values.isnan()).sum(dim=1).double(), r.sum().double()[None]])
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(counts)
    policy.train()
    result = {k: sums[j].item() / max(counts[j].item(), 1.0) for j, k in enumerate(EXAMPLE_STATS)}
    result["margin"] = result["chosen_reward"] - result["rejected_reward"]
    result["rows" if args.loss_type == "kto" else "pairs"] = int(counts[-1].item())
    return result
