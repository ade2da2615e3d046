"""What stage 3 trains on and for how long, settled before any engine is built: the prompt loaders (training,
held-out, PPO-ptx) and the schedule (iterations, evaluations, rollout size, optimizer steps)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Subset

from common import dist
from common.args import data_config
from common.data import PromptCollator, build_stage_data, load_unsupervised
from common.training.engines import eval_loader, train_loader


@dataclass
class PPOData:
    prompts: DataLoader  # training prompts, --per_device_generation_batch_size each, short last batch dropped
    heldout: DataLoader  # held-out prompts, each answered once per evaluation
    ptx: DataLoader | None  # PPO-ptx blocks of unsupervised text, or None
    streams: dict[str, tuple[int, str]]  # what each stream's position depends on: (rows, content hash)


def build_ppo_data(args: argparse.Namespace, tokenizer) -> PPOData:
    data = build_stage_data(data_config(args), tokenizer, stage=3)
    collate = PromptCollator(tokenizer.pad_token_id)
    # A rollout has a fixed size: each epoch's last, short batch of prompts is left out (counted in `plan`).
    prompts = train_loader(
        data.train, collate, args.per_device_generation_batch_size, args.seed, drop_last=True
    )
    heldout = data.eval
    if args.eval_num_prompts:
        heldout = Subset(data.eval, range(min(args.eval_num_prompts, len(data.eval))))
    # Held-out prompts are answered once each, in batches of as many sequences as a training generation batch
    # holds: runs with equal samples per batch (16 prompts x 1, 4 x 4) sample their "before" answers alike.
    heldout_dl = eval_loader(
        heldout, collate, args.per_device_generation_batch_size * args.num_samples_per_prompt
    )
    streams = {"prompt": (len(data.train), data.train_sha256)}
    ptx = None
    if args.unsupervised_dataset_name:
        blocks = load_unsupervised(
            args.unsupervised_dataset_name,
            args.unsupervised_dataset_config_name,
            tokenizer,
            args.max_prompt_seq_len + args.max_answer_seq_len,
            cache_dir=args.data_output_path,
        )
        ptx = train_loader(
            blocks, torch.utils.data.default_collate, args.per_device_training_batch_size, args.seed
        )
        streams["ptx"] = (len(blocks), "")  # its blocks are cached by content: rows say enough
    return PPOData(prompts, heldout_dl, ptx, streams)


def resolve_eval_interval(eval_interval: int | None, iterations: int) -> int:
    """--eval_interval, or by default iterations // 6 (at least 1): 5 or 6 evaluations during a run of 6 or
    more iterations, at the multiples of the interval before the last one (the final evaluation covers it)."""
    return max(iterations // 6, 1) if eval_interval is None else eval_interval


@dataclass
class Schedule:
    iterations: int  # PPO iterations (rollouts) of the run
    eval_interval: int  # held-out evaluation every this many iterations (0: before and after only)
    rollout_size: int  # sequences per rank and rollout
    optimizer_steps: int  # of the actor (and critic) over the run


def plan(args: argparse.Namespace, prompts: DataLoader) -> Schedule:
    """The run's schedule; says how many prompts each epoch leaves out, refuses a run of no iteration."""
    iterations_per_epoch = len(prompts) // args.generation_batches
    iterations = iterations_per_epoch * args.num_train_epochs
    if args.enable_test_mode:
        iterations = min(iterations, args.test_stop_step)
    if iterations < 1:
        raise SystemExit(
            f"{len(prompts.sampler)} training prompts per rank make {len(prompts)} full generation batches "
            f"(--per_device_generation_batch_size {args.per_device_generation_batch_size}), fewer than "
            f"--generation_batches {args.generation_batches}: lower them or add prompts"
        )
    unused = len(prompts.sampler) - iterations_per_epoch * args.generation_batches * prompts.batch_size
    if unused:
        dist.print_rank0(
            f"[ppo] {len(prompts.sampler)} prompts per rank and epoch: {iterations_per_epoch} iterations of "
            f"{args.generation_batches} x {prompts.batch_size}; the {unused} left over are not used that "
            "epoch (a different draw each epoch)"
        )
    rollout_size = (
        args.per_device_generation_batch_size * args.generation_batches * args.num_samples_per_prompt
    )
    minibatches = rollout_size // (args.per_device_training_batch_size * args.gradient_accumulation_steps)
    return Schedule(
        iterations=iterations,
        eval_interval=resolve_eval_interval(args.eval_interval, iterations),
        rollout_size=rollout_size,
        optimizer_steps=iterations * args.ppo_epochs * minibatches,
    )
