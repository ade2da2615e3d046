"""The training loop of the supervised stages (SFT, the reward model, DPO), written once.

A stage gives a function from a batch to (loss, statistics to log, items counted for throughput); the loop
does the bookkeeping every stage needs, in the same order for all of them:

    for each epoch from the resumed one, skipping the batches a resumed run already trained on:
        loss -> non-finite? skip it (--skip_nonfinite_steps) or stop -> backward -> step
        at the end of each gradient-accumulation window (one optimizer step):
            the window's mean loss and statistics over all ranks -> print, TensorBoard, train_log.jsonl
            -> evaluation every --eval_interval (the stage's) -> checkpoint every --save_interval
        at the end of each epoch: the stage's callback (SFT's perplexity)

Stage 3 has its own loop (rollouts, PPO epochs over them): step3_rlhf/main.py.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader

from common import dist
from common.training.checkpoint import (
    TrainerState,
    append_train_log,
    check_finite_grad_norm,
    check_finite_loss,
    epoch_batches,
    save_checkpoint,
)
from common.training.engines import optimizer_steps, to_device
from common.training.monitor import Monitor, progress

# batch -> (loss, {name: scalar tensor} to log beside it, how many items (tokens, pairs) the batch held)
StepFn = Callable[[dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor], int]]


def _print_line(stage: str, epoch: int, step: int, means: dict[str, float]) -> str:
    shown = " ".join(
        f"{k} {v:+.3f}" if k.endswith(("margin", "reward")) else f"{k} {v:.4f}" for k, v in means.items()
    )
    return f"[{stage}] epoch {epoch + 1} step {step} {shown}"


def train_supervised(
    engine: Any,
    train_dl: DataLoader,
    args: argparse.Namespace,
    state: TrainerState,
    resumed_from: str | None,
    checkpointed: dict[str, Any],
    monitor: Monitor,
    *,
    stage: str,
    unit: str,
    step_fn: StepFn,
    dev: torch.device,
    evaluate: Callable[[], None] | None = None,
    after_epoch: Callable[[int], None] | None = None,
) -> None:
    """Train `engine` for the epochs left in `state` (see the module docstring). `checkpointed`: the engines
    a checkpoint holds ({"model": engine}, DPO's reference too when it trains one); `unit` names the items
    step_fn counts (TensorBoard's train/<unit>_per_s); evaluate() runs every --eval_interval optimizer steps
    (after the step's logging, before its checkpoint; not at the last step, which the stage evaluates
    itself), after_epoch(epoch) after every epoch."""
    total_steps = optimizer_steps(len(train_dl), args.gradient_accumulation_steps, args.num_train_epochs)
    engine.train()  # from_pretrained returns eval mode; a resumed run skips the eval that switched it
    for epoch in range(state.epoch, args.num_train_epochs):
        skip = state.batches_in_epoch if epoch == state.epoch else 0
        batches: Iterable = epoch_batches(
            train_dl, epoch, skip, resumed_from if epoch == state.epoch else None
        )
        tick, items, window, names = time.perf_counter(), 0, [], ["loss"]
        for i, batch in progress(batches, total=len(train_dl) - skip, desc=f"{stage} epoch {epoch + 1}"):
            loss, stats, n = step_fn(to_device(batch, dev))
            step = engine.global_steps + 1
            if not check_finite_loss(loss, stage=stage, step=step, skip=args.skip_nonfinite_steps):
                state.skipped_steps += 1
                continue
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            items += n
            names = ["loss", *stats]
            window.append(torch.stack([loss.detach().float(), *(v.detach().float() for v in stats.values())]))
            if not boundary:
                continue
            check_finite_grad_norm(engine, stage=stage, step=step)
            means = dict(zip(names, dist.all_reduce_mean(torch.stack(window).mean(0)).tolist(), strict=True))
            per_s = items * dist.get_world_size() / (time.perf_counter() - tick)
            if args.print_loss:
                dist.print_rank0(_print_line(stage, epoch, step, means))
            scalars = {f"train/{k}": v for k, v in means.items()}
            monitor.log({**scalars, "train/lr": engine.get_lr()[0], f"train/{unit}_per_s": per_s}, step)
            append_train_log(args.output_dir, {"step": step, **means})
            interval = getattr(args, "eval_interval", 0)
            if evaluate is not None and interval and step % interval == 0 and step < total_steps:
                evaluate()
            if args.save_interval and step % args.save_interval == 0:
                state.step, state.epoch, state.batches_in_epoch = step, epoch, i + 1
                save_checkpoint(args.output_dir, checkpointed, state, args.save_total_limit)
            tick, items, window = time.perf_counter(), 0, []
        if after_epoch is not None:
            after_epoch(epoch)
