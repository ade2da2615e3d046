"""The pairwise objective and its measurements: the loss -logsigmoid(r_chosen - r_rejected - margin), the
scores of a batch of pairs, the held-out pairwise metrics summed across ranks, and the check that the saved
model scores as the engine does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import dist
from common.models.reward_model import RewardModel
from common.training.engines import to_device
from common.training.monitor import Monitor


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Per-pair loss -log sigmoid(chosen - rejected - margin) in fp32; chosen, rejected (B,) -> (B,)."""
    return -F.logsigmoid(chosen.float() - rejected.float() - margin)


def forward_pairs(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of a PairCollator batch ((2B, T): chosen rows first) -> chosen (B,), rejected (B,)."""
    scores = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).scores
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


@torch.no_grad()
def evaluate(engine, loader, dev: torch.device, margin: float, max_batches: int = 0) -> dict[str, float]:
    """Pairwise metrics over the eval set (its first `max_batches` batches per rank if > 0), summed across
    ranks: accuracy (share of pairs with r_chosen > r_rejected), mean chosen and rejected score, mean
    margin r_chosen - r_rejected, mean loss, and the number of pairs."""
    engine.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=dev)  # pairs, correct, chosen, rejected, margin, loss
    for i, (batch, real) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        chosen, rejected = forward_pairs(engine, to_device(batch, dev))
        real = real.to(dev)  # placeholder rows (padding the shards to equal length) count for nothing
        chosen, rejected = chosen.double()[real], rejected.double()[real]
        sums += torch.stack(
            [
                real.sum().double(),
                (chosen > rejected).double().sum(),
                chosen.sum(),
                rejected.sum(),
                (chosen - rejected).sum(),
                pairwise_loss(chosen, rejected, margin).double().sum(),
            ]
        )
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(sums)
    engine.train()
    n = max(sums[0].item(), 1.0)
    names = ("accuracy", "chosen_mean", "rejected_mean", "margin_mean", "loss")
    return {"pairs": int(sums[0].item()), **{k: sums[i + 1].item() / n for i, k in enumerate(names)}}


@torch.no_grad()
def saved_scores_max_diff(engine, output_dir: str, batch: dict[str, torch.Tensor]) -> float | None:
    """Reload the saved model with RewardModel.from_pretrained and return max |raw score - engine raw score|
    on `batch` (rank 0; None elsewhere). Collective under ZeRO-3: every rank must call it."""
    engine.eval()
    reference = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).scores
    diff = None
    if dist.is_rank0():
        dtype = next(engine.module.value_head.parameters()).dtype
        reloaded = RewardModel.from_pretrained(output_dir, dtype=dtype).to(reference.device).eval()
        scores = reloaded(batch["input_ids"], batch["attention_mask"]).scores
        diff = (scores - reference).abs().max().item()
    engine.train()
    return diff


def log_eval(tag: str, step: int, metrics: dict[str, float], monitor: Monitor) -> None:
    """Print the metrics of `evaluate` on rank 0 and log them as eval/<name> at `step`."""
    dist.print_rank0(
        f"[reward] {tag} step {step}: accuracy {metrics['accuracy']:.4f} over {metrics['pairs']} pairs, "
        f"chosen {metrics['chosen_mean']:.4f}, rejected {metrics['rejected_mean']:.4f}, "
        f"margin {metrics['margin_mean']:.4f}, loss {metrics['loss']:.4f}"
    )
    monitor.log({f"eval/{k}": v for k, v in metrics.items()}, step)
