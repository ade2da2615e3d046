"""LoRA through peft: the target modules (DeepSpeed-Chat's name-substring semantics), adapters on a causal
LM, and merging adapters into plain weights (W + alpha/r * B @ A) so saved models load without peft.
"""

from __future__ import annotations

import torch
from torch import nn


def lora_target_modules(model: nn.Module, module_name: str, flag: str = "--lora_module_name") -> list[str]:
    """Names of the Linear (or GPT-2 Conv1D) layers whose name contains `module_name` (`flag` names it in
    the error raised when there is none)."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D) and module_name in n]
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)][:8]
        raise ValueError(
            f"{flag} {module_name!r} matches no Linear layer of {type(model).__name__}; "
            f"Linear layers look like: {linear}"
        )
    return names


def apply_lora(
    model: nn.Module, *, lora_dim: int, module_name: str, alpha: float = 1.0, only_optimize_lora: bool = False
) -> nn.Module:
    """Wrap `model` with peft LoRA adapters of rank `lora_dim` on every Linear matching `module_name`.

    Without `only_optimize_lora` the base weights stay trainable too (DeepSpeed-Chat semantics)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, module_name)
    fan_in_fan_out = type(model).__name__.startswith("GPT2")  # GPT-2 stores Conv1D weights transposed
    cfg = LoraConfig(
        r=lora_dim,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    if not only_optimize_lora:
        for name, p in peft_model.named_parameters():
            if "lora_" not in name:
                p.requires_grad_(True)
    return peft_model


def is_lora_param(name: str) -> bool:
    return "lora_A" in name or "lora_B" in name


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scaling: float, fan_in_fan_out: bool) -> dict:
    """Fold peft LoRA weights into plain weights: W' = W + scaling * B @ A (transposed for Conv1D).

    Input keys look like `base_model.model.<name>.base_layer.weight`, `...<name>.lora_A.default.weight`;
    output keys are the plain model's (`<name>.weight`)."""
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if is_lora_param(key):
            continue
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if ".base_layer." in name:
            module = name.split(".base_layer.")[0]
            suffix = name.split(".base_layer.")[1]
            name = f"{module}.{suffix}"
            if suffix == "weight":
                a = state_dict[f"{prefix}{module}.lora_A.default.weight"].float()
                b = state_dict[f"{prefix}{module}.lora_B.default.weight"].float()
                delta = scaling * (b @ a)
                if fan_in_fan_out:
                    delta = delta.T
                value = (value.float() + delta).to(value.dtype)
        out[name] = value
    return out
