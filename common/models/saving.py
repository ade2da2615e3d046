"""Saving models as Hugging Face directories (config, safetensors, tokenizer): ZeRO-3 partitions gathered
one parameter at a time onto rank 0, LoRA merged, for causal LMs and reward models alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    PreTrainedTokenizerBase,
)

from common import dist
from common.models.forward import position_ids_from_mask, unwrap_engine
from common.models.lora import merge_lora_state_dict
from common.models.reward_model import merge_backbone_lora


def gathered_state_dict(module: nn.Module, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full state dict on CPU on rank 0 (None elsewhere). Under ZeRO-3 each parameter is gathered in turn,
    so no rank ever holds more than one full parameter beyond its partition."""
    if zero_stage != 3:
        if not dist.is_rank0():
            return None
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    import deepspeed

    out: dict[str, torch.Tensor] = {} if dist.is_rank0() else None
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            if out is not None:
                out[name] = param.detach().cpu().clone()
    if out is not None:
        persistent = set(module.state_dict().keys())  # named_buffers() also yields non-persistent ones
        for name, buf in module.named_buffers():
            if name in persistent:
                out[name] = buf.detach().cpu().clone()
    return out


def plain_state_dict(model: nn.Module, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Rank-0 state dict of `model` (engine or module) in plain Hugging Face naming, LoRA merged."""
    model = unwrap_engine(model)
    sd = gathered_state_dict(model, zero_stage)
    if sd is None:
        return None
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        cfg = peft_config["default"]
        sd = merge_lora_state_dict(sd, cfg.lora_alpha / cfg.r, cfg.fan_in_fan_out)
    return sd


def base_config(model: nn.Module):
    model = unwrap_engine(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.config


def save_hf_model(
    model: nn.Module,
    output_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None,
    zero_stage: int,
) -> None:
    """Save `model` (engine, peft model or plain model) as a Hugging Face directory on rank 0:
    config.json, generation_config.json, model*.safetensors, tokenizer files. Collective under ZeRO-3:
    every rank must call it."""
    from huggingface_hub import save_torch_state_dict

    state_dict = plain_state_dict(model, zero_stage)
    if dist.is_rank0():
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = base_config(model)
        if getattr(config, "tie_word_embeddings", False):
            state_dict.pop("lm_head.weight", None)
        save_torch_state_dict(state_dict, out, max_shard_size="5GB", safe_serialization=True)
        config.save_pretrained(out)
        inner = unwrap_engine(model)
        gen = getattr(
            inner.get_base_model() if hasattr(inner, "get_base_model") else inner, "generation_config", None
        )
        if gen is not None:
            gen.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    dist.barrier()


def trainable_parameter_names(model: nn.Module) -> Iterable[str]:
    return [n for n, p in unwrap_engine(model).named_parameters() if p.requires_grad]


@torch.no_grad()
def saved_logits_max_diff(
    engine: nn.Module, output_dir: str | os.PathLike, batch: dict[str, torch.Tensor]
) -> float | None:
    """Reload the saved causal LM with `from_pretrained` and return max |logits - engine logits| on `batch`
    (rank 0; None on other ranks). Collective under ZeRO-3: every rank must call it."""
    engine.eval()
    kwargs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "position_ids": position_ids_from_mask(batch["attention_mask"]),
        "use_cache": False,
    }
    engine_logits = engine(**kwargs).logits
    reference = engine_logits.float()
    diff = None
    if dist.is_rank0():
        reloaded = (  # in the engine's dtype: a bf16 run is compared with its saved bf16 weights, not upcast
            AutoModelForCausalLM.from_pretrained(output_dir, dtype=engine_logits.dtype)
            .to(reference.device)
            .eval()
        )
        logits = reloaded(**kwargs).logits.float()
        vocab = min(logits.shape[-1], reference.shape[-1])  # the engine may carry padded embedding rows
        diff = (logits[..., :vocab] - reference[..., :vocab]).abs().max().item()
    engine.train()
    return diff


def reward_state_dict(model: nn.Module, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full CPU state dict of a RewardModel (or its DeepSpeed engine) on rank 0, None elsewhere, with
    ZeRO-3 partitions gathered and LoRA merged: the keys of a plain RewardModel. Collective under ZeRO-3."""
    rm = getattr(model, "module", model)
    sd = gathered_state_dict(rm, zero_stage)
    if sd is None:
        return None
    # Only what state_dict() would hold (gathering walks named_buffers, which includes non-persistent ones).
    keep = set(rm.state_dict().keys())
    return merge_backbone_lora(rm, {k: v for k, v in sd.items() if k in keep})


def save_reward_model(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any | None, zero_stage: int
) -> None:
    """Save a RewardModel or its engine (ZeRO 0-3, LoRA or not) as one directory that
    `RewardModel.from_pretrained` loads without peft or DeepSpeed. Every rank must call it; rank 0 writes."""
    rm = getattr(model, "module", model)
    state_dict = reward_state_dict(rm, zero_stage)
    if dist.is_rank0():
        rm.save_pretrained(out_dir, tokenizer=tokenizer, state_dict=state_dict)
    dist.barrier()
