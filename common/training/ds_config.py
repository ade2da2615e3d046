"""The one DeepSpeed config builder for every stage and every engine.

`train_config` is for engines that learn (SFT model, reward model, actor, critic); `eval_config` is for
frozen engines (reference, reward in stage 3), which need no optimizer states and, under ZeRO-3, only
parameter partitioning. Both resolve `--dtype auto` the same way so all engines of a run agree.
"""

from __future__ import annotations

from typing import Any

import torch


def resolve_dtype(dtype: str) -> str:
    """'auto' -> 'bf16' on a GPU with bf16, 'fp16' on other GPUs, 'fp32' on CPU. Others pass through."""
    if dtype != "auto":
        return dtype
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def torch_dtype(dtype: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[resolve_dtype(dtype)]


def _precision_section(dtype: str) -> dict[str, Any]:
    dtype = resolve_dtype(dtype)
    if dtype == "fp16":
        return {"fp16": {"enabled": True, "loss_scale_window": 100, "initial_scale_power": 16}}
    if dtype == "bf16":
        return {"bf16": {"enabled": True}}
    return {}


def train_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    dtype: str = "auto",
    offload: bool = False,
    gradient_clipping: float = 1.0,
) -> dict[str, Any]:
    """DeepSpeed config for a trainable engine (stage 3 adds the actor's `hybrid_engine` section itself,
    once it knows whether DeepSpeed can build kernels for the model: step3_rlhf/engines.py)."""
    device = "cpu" if offload else "none"
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "offload_param": {"device": device if zero_stage == 3 else "none"},
        "offload_optimizer": {"device": device},
        "stage3_param_persistence_threshold": 1e4,
        "stage3_max_live_parameters": 3e7,
        "stage3_prefetch_bucket_size": 3e7,
        "memory_efficient_linear": False,
    }
    config: dict[str, Any] = {
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "steps_per_print": 10**9,  # we log ourselves
        "zero_optimization": zero,
        "gradient_clipping": gradient_clipping,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        **_precision_section(dtype),
    }
    if offload:
        # A torch optimizer is allowed with offload when no DeepSpeed CPU Adam can be built.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def eval_config(
    *, zero_stage: int, micro_batch_size: int, world_size: int, dtype: str = "auto", offload: bool = False
) -> dict[str, Any]:
    """DeepSpeed config for a frozen engine (no optimizer). ZeRO-1/2 shard only optimizer states and
    gradients, which a frozen model has none of, so they collapse to stage 0."""
    stage = 3 if zero_stage == 3 else 0
    return {
        "train_batch_size": micro_batch_size * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "steps_per_print": 10**9,
        "zero_optimization": {
            "stage": stage,
            "offload_param": {"device": "cpu" if offload and stage == 3 else "none"},
            "stage3_param_persistence_threshold": 1e4,
            "memory_efficient_linear": False,
        },
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        **_precision_section(dtype),
    }
