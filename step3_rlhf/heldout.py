"""Held-out evaluation of the policy: the reward model's score of sampled answers to prompts never trained on.

Stage 3 evaluates before PPO (the stage-1 policy), every `--eval_interval` iterations and after PPO, with the
same sampling seed each time, so that the before/after comparison differs only by the policy. The before and
after answers themselves go to `heldout_answers.jsonl`, one row per prompt, to read what PPO changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from common import dist
from common.training import to_device
from step3_rlhf.experience import ExperienceMaker

ANSWERS_FILE = "heldout_answers.jsonl"


@torch.no_grad()
def evaluate(
    maker: ExperienceMaker, loader: DataLoader, dev: torch.device, seed: int
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mean normalised RM score, length and EOS fraction of sampled answers to the held-out prompts, and
    (on rank 0; empty elsewhere) every prompt with its answer and score, in the eval set's order.

    `loader` is a `common.training.eval_loader`: rank r holds rows r, r + world, ... padded with placeholder
    rows (`real` False) that are sampled, to keep ranks in step, but not counted."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = maker.tokenizer
    totals = torch.zeros(4, dtype=torch.float64, device=dev)  # score, length, eos, count
    answers: list[dict[str, Any]] = []
    position = 0  # of this rank's rows
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed + rank)
        for batch, real in loader:
            batch = to_device(batch, dev)
            seq, attn, mask, ends = maker.sample(batch["input_ids"], batch["attention_mask"])
            scores = maker.e.reward(seq, attn, normalize=True).scores.double()
            r = real.to(dev)
            lengths = mask.sum(1)
            totals += torch.stack(
                [scores[r].sum(), lengths[r].double().sum(), ends[r].double().sum(), r.sum().double()]
            )
            prompt_len = batch["input_ids"].shape[1]
            for i in range(seq.shape[0]):
                if real[i]:
                    answers.append(
                        {
                            "index": rank + (position + i) * world,
                            "prompt": tokenizer.decode(seq[i, :prompt_len], skip_special_tokens=True),
                            "answer": tokenizer.decode(seq[i, prompt_len:][mask[i].bool()]),
                            "score": scores[i].item(),
                        }
                    )
            position += seq.shape[0]
    if world > 1:
        torch.distributed.all_reduce(totals)
        gathered: list[list[dict[str, Any]]] | None = [[] for _ in range(world)] if rank == 0 else None
        torch.distributed.gather_object(answers, gathered, dst=0)
        answers = [a for part in gathered for a in part] if gathered is not None else []
    answers.sort(key=lambda a: a["index"])
    n = max(totals[3].item(), 1.0)
    stats = {
        "score": totals[0].item() / n,
        "response_length": totals[1].item() / n,
        "eos_fraction": totals[2].item() / n,
    }
    return stats, answers


def write_heldout_answers(path: Path, before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    """One JSON line per held-out prompt: prompt, the stage-1 policy's and the PPO policy's answers and scores.
    Answers are decoded with special tokens, so an answer that stopped at EOS shows it."""
    if [a["index"] for a in before] != [a["index"] for a in after]:
        raise ValueError("write_heldout_answers: the before and after evaluations cover different prompts")
    with open(path, "w") as f:
        for b, a in zip(before, after, strict=True):
            row = {
                "prompt": b["prompt"],
                "before": b["answer"],
                "after": a["answer"],
                "score_before": b["score"],
                "score_after": a["score"],
            }
            f.write(json.dumps(row) + "\n")
