"""Mechanics every training stage shares: seeding, data loaders, engine construction, output dirs."""

from __future__ import annotations

import math
import random
import resource
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common import dist
from common.models.loading import load_causal_lm
from common.models.lora import apply_lora
from common.models.reward_model import RewardModel, apply_lora_to_backbone
from common.training.ds_config import eval_config, torch_dtype
from common.training.optim import build_optimizer, build_scheduler


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def device() -> torch.device:
    """This rank's device: its GPU under the launcher, else CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_local_rank())
        return torch.device("cuda", dist.get_local_rank())
    return torch.device("cpu")


def to_device(batch: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_loader(
    dataset: Dataset, collate: Callable, batch_size: int, seed: int, drop_last: bool = False
) -> DataLoader:
    """Shuffled per epoch (call `loader.sampler.set_epoch(e)`), the same order on every rank for a seed,
    each rank a disjoint shard; every rank gets the same number of batches (ZeRO needs lock-step).
    `drop_last`: leave out each epoch's last, short batch (stage 3's rollouts have a fixed size)."""
    sampler = DistributedSampler(
        dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=True, seed=seed
    )
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=drop_last
    )


class _EvalShard(Dataset):
    """This rank's slice of an eval set, padded to the longest rank's length with placeholder items
    (marked not real) so that every rank runs the same number of forwards and nothing is counted twice."""

    def __init__(self, dataset: Dataset, rank: int, world: int):
        self.dataset = dataset
        per_rank = math.ceil(len(dataset) / world)
        own = list(range(rank, len(dataset), world))
        self.items: list[int | None] = own + [None] * (per_rank - len(own))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        idx = self.items[i]
        return (self.dataset[0 if idx is None else idx], idx is not None)


def eval_loader(dataset: Dataset, collate: Callable, batch_size: int) -> DataLoader:
    """Yields (batch, real) where `real` (B,) bool marks the rows that are not placeholders."""
    shard = _EvalShard(dataset, dist.get_rank(), dist.get_world_size())

    def collate_with_flags(items):
        batch = collate([item for item, _ in items])
        return batch, torch.tensor([real for _, real in items], dtype=torch.bool)

    return DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate_with_flags)


def init_engine(
    model: torch.nn.Module,
    *,
    ds_config: dict,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    offload: bool,
    lora_lr: float | None,
    scheduler_type: str,
    warmup_steps: int,
    total_steps: int,
):
    """Wrap `model` in a DeepSpeed engine with our optimizer and schedule; returns the engine."""
    import deepspeed

    optimizer = build_optimizer(
        model, lr=lr, weight_decay=weight_decay, betas=tuple(betas), offload=offload, lora_lr=lora_lr
    )
    scheduler = build_scheduler(scheduler_type, optimizer, warmup_steps, total_steps)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine


def frozen_engine(
    model: torch.nn.Module, zero_stage: int, offload: bool, micro_batch: int, dtype: str
) -> torch.nn.Module:
    """Inference-only engine; offloading a frozen model means ZeRO-3 with its parameters on CPU."""
    stage = 3 if offload else zero_stage
    cfg = eval_config(
        zero_stage=stage,
        micro_batch_size=micro_batch,
        world_size=dist.get_world_size(),
        dtype=dtype,
        offload=offload,
    )
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    return engine


def optimizer_steps(num_batches: int, grad_accum: int, epochs: int) -> int:
    return math.ceil(num_batches / grad_accum) * epochs


def stage_ds_config(args) -> dict:
    """DeepSpeed config of the trained model of stage 1 or 2, from the shared flags."""
    from common.training.ds_config import train_config

    return train_config(
        zero_stage=args.zero_stage,
        micro_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        world_size=dist.get_world_size(),
        dtype=args.dtype,
        offload=args.offload,
        gradient_clipping=args.gradient_clipping,
    )


def with_lora_and_checkpointing(
    model: torch.nn.Module,
    *,
    lora_dim: int,
    module_name: str,
    alpha: float,
    only_optimize_lora: bool,
    gradient_checkpointing: bool,
) -> torch.nn.Module:
    """Gradient checkpointing and LoRA (peft, rank `lora_dim` > 0) on a causal LM or a RewardModel (adapters on
    its trunk, the value head trainable). With both, the trunk's inputs require grad, so LoRA's gradients
    cross the checkpointed blocks whatever checkpointing mode transformers uses. Returns the model to train
    (a causal LM comes back wrapped in peft; a RewardModel is adapted in place)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora_dim <= 0:
        return model
    lora = {"lora_dim": lora_dim, "module_name": module_name, "alpha": alpha}
    if isinstance(model, RewardModel):
        model = apply_lora_to_backbone(model, only_optimize_lora=only_optimize_lora, **lora)
        trunk = model.backbone
    else:
        model = trunk = apply_lora(model, only_optimize_lora=only_optimize_lora, **lora)
    if gradient_checkpointing:
        trunk.enable_input_require_grads()
    return model


def lora_and_checkpointing_flags(args, prefix: str = "") -> dict[str, Any]:
    """`with_lora_and_checkpointing`'s keywords from a model's shared flags: a one-model stage's (stages 1, 2,
    DPO; prefix "") or one of stage 3's models (prefix "actor_" or "critic_"; --only_optimize_lora is shared)."""
    return {
        "lora_dim": getattr(args, f"{prefix}lora_dim"),
        "module_name": getattr(args, f"{prefix}lora_module_name"),
        "alpha": getattr(args, f"{prefix}lora_alpha"),
        "only_optimize_lora": args.only_optimize_lora,
        "gradient_checkpointing": getattr(args, f"{prefix}gradient_checkpointing"),
    }


def stage_causal_lm(args, tokenizer, ds_config: dict, dropout: float | None) -> torch.nn.Module:
    """The causal LM a one-model stage trains (stage 1, DPO) from the shared flags: loaded from
    --model_name_or_path (ZeRO-3-partitioned at load when ds_config says so), gradient checkpointing and LoRA
    (peft) when asked. `dropout` None keeps the model's config."""
    model = load_causal_lm(
        args.model_name_or_path,
        tokenizer,
        dtype=torch_dtype(args.dtype),
        dropout=dropout,
        ds_config=ds_config,
        trust_remote_code=args.trust_remote_code,
        allow_pickle_weights=args.allow_pickle_weights,
    )
    return with_lora_and_checkpointing(model, **lora_and_checkpointing_flags(args))


def engine_from_flags(model: torch.nn.Module, args, ds_config: dict, total_steps: int, prefix: str = ""):
    """The DeepSpeed engine of a trained model, its optimizer and schedule from its flags: a one-model
    stage's (prefix "") or one of stage 3's models (prefix "actor_" or "critic_": --actor_learning_rate,
    --critic_weight_decay, ...; the schedule's type and warm-up are shared)."""

    def flag(name: str) -> Any:
        return getattr(args, f"{prefix}{name}")

    return init_engine(
        model,
        ds_config=ds_config,
        lr=flag("learning_rate"),
        weight_decay=flag("weight_decay"),
        betas=args.adam_betas,
        offload=args.offload,
        lora_lr=flag("lora_learning_rate") if flag("lora_dim") > 0 else None,
        scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.num_warmup_steps,
        total_steps=total_steps,
    )


def stage_engine(model: torch.nn.Module, args, ds_config: dict, batches_per_epoch: int):
    """The DeepSpeed engine of stage 1 or 2 (or DPO's policy), from the shared flags."""
    steps = optimizer_steps(batches_per_epoch, args.gradient_accumulation_steps, args.num_train_epochs)
    return engine_from_flags(model, args, ds_config, steps)


def peak_memory_mb() -> float:
    """Peak memory of this process so far, in MiB: the accelerator's allocated peak on a GPU, the resident
    set's peak (RSS) on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
