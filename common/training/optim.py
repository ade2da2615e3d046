"""Optimizer and learning-rate schedule for a trainable engine."""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_scheduler

from common.models.lora import is_lora_param

_NO_DECAY = (
    "bias",
    "layer_norm.weight",
    "layernorm.weight",
    "norm.weight",
    "ln_f.weight",
    "ln_1.weight",
    "ln_2.weight",
)


def param_groups(model: nn.Module, weight_decay: float, lora_lr: float | None) -> list[dict]:
    """AdamW groups: decayed weights, undecayed biases/norms, and LoRA weights at their own rate."""
    decay, no_decay, lora = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_lora_param(name):
            lora.append(p)
        elif any(name.endswith(s) for s in _NO_DECAY):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if lora:
        groups.append({"params": lora, "weight_decay": 0.0, **({"lr": lora_lr} if lora_lr else {})})
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    offload: bool,
    lora_lr: float | None = None,
) -> torch.optim.Optimizer:
    """DeepSpeed's fused Adam on GPU, its CPU Adam with offload, torch AdamW otherwise (CPU)."""
    groups = param_groups(model, weight_decay, lora_lr)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)
    if torch.cuda.is_available():
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, lr=lr, betas=betas, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup: int, total_steps: int):
    return get_scheduler(
        name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1)
    )
