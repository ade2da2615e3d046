"""The reward model: a transformer trunk plus a scalar head, read at the last valid token.

Stage 2 trains it on preference pairs; stage 3 uses it twice, frozen as the reward engine and as the
initialisation of the critic (docs/ppo-fidelity.md items 9-11, 13).

    rm = RewardModel.from_pretrained("facebook/opt-350m")     # any causal LM: trunk + fresh head
    out = rm(input_ids, attention_mask)                        # out.values (B, L), out.scores (B,)
    gain, bias = fit_normalization(raw_scores_of_sft_samples)
    rm.set_normalization(gain, bias, "2048 SFT samples on the prompt set")
    rm.save_pretrained("out/rm", tokenizer=tok)                # one Hugging Face directory
    rm = RewardModel.from_pretrained("out/rm")                 # trunk + trained head + normalisation

Training (stage 2) and the stage-3 engines go through `load_reward_model_for_training` (dropout override,
ZeRO-3 partitioned construction, embeddings resized to the tokenizer), `apply_lora_to_backbone` and
`save_reward_model` (collective: gathers ZeRO-3 partitions and merges LoRA before writing).

On disk a reward model is a normal Hugging Face directory of the trunk (`config.json` +
`model.safetensors`, so `AutoModel.from_pretrained(dir)` loads the trunk alone), plus
`value_head.safetensors` and an extra `reward_model` key in `config.json` that names the head file and
stores the normalisation (gain, bias and a description of the sample they were fitted on).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import cached_file

from common import dist
from common.models.loading import EMBEDDING_MULTIPLE, ZeRO3Init, align_special_tokens, load_config
from common.models.lora import is_lora_param, lora_target_modules, merge_lora_state_dict
from common.models.weights import (
    DSCHAT_HEAD_KEY,
    DSCHAT_TRUNK_PREFIX,
    checkpoint_keys,
    from_pretrained_checked,
    is_dschat_reward_layout,
    read_checkpoint_tensor,
)

logger = logging.getLogger(__name__)

CONFIG_KEY = "reward_model"
HEAD_FILE = "value_head.safetensors"
DSCHAT_SAMPLE = "none: a DeepSpeed-Chat reward model, converted (raw scores)"
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


class RewardModelOutput(NamedTuple):
    """What `RewardModel.forward` returns.

    A NamedTuple, not a dataclass, so that DeepSpeed ZeRO-3 can find the tensors in it (it looks inside
    tuples, lists and dicts only) and hook the backward pass of the module that returned them.

    values: (B, L) float32, the head's output at every position; 0 at positions whose mask is 0.
    scores: (B,) float32, the value at the last valid token of each row (normalised if asked for).
    end_index: (B,) int64, the position the score was read at (last position with mask 1).
    """

    values: torch.Tensor
    scores: torch.Tensor
    end_index: torch.Tensor


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last 1 in each row of a (B, L) attention mask, as a (B,) int64 tensor.

    Works for left padding, right padding and both at once, because it never looks at token ids.
    Raises ValueError when a row has no valid token.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, L), got shape {tuple(attention_mask.shape)}")
    valid = attention_mask != 0
    empty = ~valid.any(dim=-1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} have no valid token; cannot read a score")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(valid, positions, -1).amax(dim=-1)


def fit_normalization(
    raw_scores: torch.Tensor, target_mean: float = 0.0, target_std: float = 1.0
) -> tuple[float, float]:
    """Gain and bias that map a sample of raw scores to the target mean and std (item 11).

    raw_scores: (N,) raw (unnormalised) scores, N >= 2, e.g. of SFT-policy responses.
    Returns (gain, bias) with gain = target_std / std and bias = target_mean - gain * mean, where std is
    the population std (ddof 0), so that gain * raw_scores + bias has exactly the target mean and std.
    """
    x = raw_scores.detach().flatten().to(torch.float64)
    if x.numel() < 2:
        raise ValueError(f"fit_normalization needs at least 2 scores, got {x.numel()}")
    if not torch.isfinite(x).all():
        raise ValueError("fit_normalization: raw_scores contain NaN or inf")
    std = x.std(unbiased=False).item()
    if std == 0.0:
        raise ValueError("fit_normalization: all raw scores are equal (std 0); cannot fit a gain")
    gain = target_std / std
    bias = target_mean - gain * x.mean().item()
    return gain, bias


def _output_dim(backbone: PreTrainedModel) -> int:
    """Width of the trunk's last hidden state, i.e. the input width of the LM head it came with.

    Not `config.hidden_size`: OPT-350m projects its 1024-wide stream down to `word_embed_proj_dim` = 512
    (`project_out`) before the LM head. The LM head is tied to (or shaped like) the input embedding, so
    the embedding width is what the last hidden state has. It is read from an attribute, not from a
    dummy forward pass, so it also works when ZeRO-3 has partitioned the weights.
    """
    embeddings = backbone.get_input_embeddings()
    dim = getattr(embeddings, "embedding_dim", None)
    if dim is None:
        dim = getattr(backbone.config, "word_embed_proj_dim", None) or backbone.config.hidden_size
    return int(dim)


def _accepts_position_ids(module: nn.Module) -> bool:
    if hasattr(module, "get_base_model"):  # a peft wrapper forwards **kwargs to the model it wraps
        module = module.get_base_model()
    return "position_ids" in inspect.signature(module.forward).parameters


def _plain_backbone(backbone: nn.Module) -> PreTrainedModel:
    """The Hugging Face model under a peft wrapper (or the backbone itself)."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


class ValueHead(nn.Linear):
    """Linear(d, 1) that computes in float32 whatever the dtype of its weights and input:
    hidden (B, L, d) -> (B, L, 1) float32.

    Under --dtype bf16/fp16 DeepSpeed casts the whole model, head included, to half precision. A half head
    would round every raw score to 8 (bf16) or 11 (fp16) significant bits, i.e. to steps of |raw| * 2^-8
    in bf16, which the normalisation gain then multiplies: rewards and values would move in visible steps.
    It stays a module called on its input, so ZeRO-3's hooks gather its parameters as for any Linear, and
    its state-dict keys are Linear's (weight (1, d), bias (1,)).
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(hidden.float(), self.weight.float(), bias)


class RewardModel(nn.Module):
    """A transformer trunk (`AutoModel`, no LM head) plus `value_head` = Linear(d, 1), computed in
    float32 (`ValueHead`).

    `gain` and `bias` (python floats, default 1 and 0) define the normalised score gain * raw + bias.
    Dropout is left as the trunk's config has it; the caller disables it where needed.
    """

    def __init__(self, backbone: PreTrainedModel, value_head: nn.Linear | None = None) -> None:
        """Wrap `backbone`; with no `value_head`, make a fresh one from the global torch RNG.

        A fresh head has weight ~ N(0, std = 1/sqrt(d + 1)) and bias 0 (item 10), in the trunk's dtype.
        """
        super().__init__()
        self.backbone = backbone
        d = _output_dim(backbone)
        if value_head is None:
            value_head = ValueHead(d, 1)
            nn.init.normal_(value_head.weight, mean=0.0, std=1.0 / math.sqrt(d + 1))
            nn.init.zeros_(value_head.bias)
            value_head.to(dtype=backbone.dtype)
        elif value_head.in_features != d or value_head.out_features != 1:
            raise ValueError(
                f"value_head is Linear({value_head.in_features}, {value_head.out_features}); "
                f"the backbone needs Linear({d}, 1)"
            )
        if type(value_head) is nn.Linear:
            value_head.__class__ = ValueHead  # the same parameters, computed in float32
        self.value_head = value_head
        self.gain: float = 1.0
        self.bias: float = 0.0
        self.normalization_sample: str = ""
        self._pass_position_ids = _accepts_position_ids(backbone)
        if not self._pass_position_ids:
            logger.warning(
                "%s.forward takes no position_ids; positions come from the model itself, so left padding "
                "may change scores if it uses absolute position embeddings",
                type(backbone).__name__,
            )

    @property
    def config(self) -> PretrainedConfig:
        """The backbone's Hugging Face config (DeepSpeed and HF helpers look for `.config`)."""
        return self.backbone.config

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Turn on activation checkpointing in the backbone (the head is too small to matter).

        transformers 5 renamed it `activation_checkpointing_enable` (the old name warns); use whichever exists.
        """
        if hasattr(self.backbone, "activation_checkpointing_enable"):
            self.backbone.activation_checkpointing_enable(
                activation_checkpointing_kwargs=gradient_checkpointing_kwargs
            )
        else:
            self.backbone.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=gradient_checkpointing_kwargs
            )

    def gradient_checkpointing_disable(self) -> None:
        if hasattr(self.backbone, "activation_checkpointing_disable"):
            self.backbone.activation_checkpointing_disable()
        else:
            self.backbone.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.backbone.modules())

    # ------------------------------------------------------------------ forward and normalisation

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = False
    ) -> RewardModelOutput:
        """Score (B, L) token ids whose padding (left, right or both) is marked by attention_mask 0.

        Positions are counted over valid tokens only (position_ids = cumsum(mask) - 1, clipped at 0), so
        padding never changes a number. `scores` are read at the last valid token; with normalize=True
        they are gain * raw + bias. `values` are always raw.
        """
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                "must both be (B, L)"
            )
        end_index = last_token_index(attention_mask)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "use_cache": False,
        }
        if self._pass_position_ids:
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(**kwargs).last_hidden_state  # (B, L, d)
        if hidden.shape[-1] != self.value_head.in_features:
            raise RuntimeError(
                f"backbone returned hidden states of width {hidden.shape[-1]}, "
                f"value_head expects {self.value_head.in_features}"
            )
        values = self.value_head(hidden).squeeze(-1)  # (B, L) float32 whatever the model's dtype
        # Pad slots can hold anything (even NaN from fully masked attention rows); make them a clean 0.
        values = torch.where(attention_mask != 0, values, torch.zeros_like(values))
        scores = values.gather(1, end_index.unsqueeze(1)).squeeze(1)  # (B,)
        if normalize:
            scores = self.normalize_scores(scores)
        return RewardModelOutput(values=values, scores=scores, end_index=end_index)

    def normalize_scores(self, raw_scores: torch.Tensor) -> torch.Tensor:
        """gain * raw_scores + bias, any shape."""
        return raw_scores * self.gain + self.bias

    def set_normalization(self, gain: float, bias: float, sample_description: str) -> None:
        """Store the normalisation (saved with the model); describe the sample it was fitted on."""
        gain, bias = float(gain), float(bias)
        if not (math.isfinite(gain) and math.isfinite(bias)) or gain <= 0:
            raise ValueError(f"normalisation needs a finite gain > 0 and a finite bias, got {gain}, {bias}")
        self.gain, self.bias, self.normalization_sample = gain, bias, str(sample_description)

    @torch.no_grad()
    def fold_normalization_into_head(self) -> None:
        """Make raw outputs normalised: head weight *= gain, head bias = gain * bias_head + bias; then gain 1,
        bias 0. Step 3 does this to the critic so that its initial values are in the units of the
        (normalised) rewards it learns to predict. Call before the head is partitioned (ZeRO-3)."""
        self.value_head.weight.mul_(self.gain)
        self.value_head.bias.mul_(self.gain).add_(self.bias)
        self.normalization_sample = f"folded into the head ({self.normalization_sample})"
        self.gain, self.bias = 1.0, 0.0

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        tokenizer: Any | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the model to `out_dir` (created if needed) as one Hugging Face directory; returns it.

        state_dict: optional full state dict in plain naming, i.e. the keys `self.state_dict()` has
        without LoRA (e.g. gathered from ZeRO-3 and LoRA-merged on rank 0 by `reward_state_dict`); its
        tensors are written instead of the module's own. A LoRA-wrapped backbone is merged first when no
        state_dict is given. Call on one rank only (`save_reward_model` is the collective wrapper).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = merge_backbone_lora(self, self.state_dict())
        else:
            expected = {_plain_key(k) for k in self.state_dict() if not is_lora_param(k)}
            missing = sorted(expected - state_dict.keys())
            unexpected = sorted(state_dict.keys() - expected)
            if missing or unexpected:
                raise ValueError(
                    f"save_pretrained(state_dict=...): keys must match RewardModel.state_dict(); "
                    f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
                )
        prefix = "backbone."
        backbone_sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        # The plain HF model (under LoRA its Linear layers are wrapped, but its class, config and tied
        # weights are the original ones, which is all save_pretrained reads when given a state dict).
        _plain_backbone(self.backbone).save_pretrained(out, state_dict=backbone_sd)
        head = {
            "weight": state_dict["value_head.weight"].detach().cpu().contiguous(),
            "bias": state_dict["value_head.bias"].detach().cpu().contiguous(),
        }
        save_file(head, str(out / HEAD_FILE), metadata={"format": "pt"})

        config_path = out / "config.json"
        config = json.loads(config_path.read_text())
        config[CONFIG_KEY] = {
            "value_head": HEAD_FILE,
            "gain": self.gain,
            "bias": self.bias,
            "normalization_sample": self.normalization_sample,
        }
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return out

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        require_saved_head: bool = False,
        **hf_kwargs: Any,
    ) -> RewardModel:
        """Load a saved reward model, or any causal-LM checkpoint as a trunk with a fresh head.

        A directory whose config.json has the `reward_model` key gives trunk + saved head + saved
        normalisation; a DeepSpeed-Chat reward model (`rwtransformer.*`, `v_head.weight`) is converted
        (`_load_trunk`); anything else (e.g. a stage-1 *ForCausalLM output, whose lm_head is dropped)
        gives the trunk and a fresh head drawn from the caller's torch RNG, or with `require_saved_head`
        a ValueError. `hf_kwargs` go to `AutoModel.from_pretrained` (revision, cache_dir,
        attn_implementation, ...); pickle weights are read only with use_safetensors=None or False.
        A checkpoint whose trunk weights do not fit is a `common.models.weights.WeightsMismatchError`.
        """
        if hf_kwargs.pop("trust_remote_code", False):
            raise ValueError("RewardModel.from_pretrained does not run remote code (trust_remote_code)")
        if dtype is not None:
            hf_kwargs["dtype"] = dtype
        allow_pickle = hf_kwargs.pop("use_safetensors", True) is not True  # no unpickling unless asked for
        hub_kwargs = {k: hf_kwargs.pop(k) for k in _HUB_KWARGS if k in hf_kwargs}
        backbone, dschat_head = _load_trunk(
            path_or_id, allow_pickle, hub_kwargs, trust_remote_code=False, **hf_kwargs
        )
        return _assemble(cls, backbone, path_or_id, hub_kwargs, dschat_head, require_saved_head)


def _load_trunk(
    path_or_id: str | os.PathLike, allow_pickle_weights: bool, hub_kwargs: dict, **kwargs: Any
) -> tuple[PreTrainedModel, torch.Tensor | None]:
    """The trunk (AutoModel, checked: no weight left random or dropped, bar a *ForCausalLM* checkpoint's LM
    head) and, for a DeepSpeed-Chat reward model, its v_head weight (1, d) (else None).

    DeepSpeed-Chat's step 2 saves `rwtransformer.<trunk key>` and `v_head.weight` (Linear(d, 1), no bias):
    the trunk is loaded with the prefix stripped, and one message says so (rank 0)."""
    keys = checkpoint_keys(path_or_id, allow_pickle_weights, **hub_kwargs)
    if not is_dschat_reward_layout(keys):
        trunk = from_pretrained_checked(
            AutoModel,
            path_or_id,
            allow_pickle_weights=allow_pickle_weights,
            trunk=True,
            hub_kwargs=hub_kwargs,
            **kwargs,
        )
        return trunk, None
    dist.print_rank0(
        f"[model] {path_or_id}: a DeepSpeed-Chat reward model ({DSCHAT_TRUNK_PREFIX}*, {DSCHAT_HEAD_KEY}), "
        "converted on load: its trunk, and v_head as the value head with bias 0; scores not normalised. "
        f"`python -m tools.convert_dschat {path_or_id} DST` writes it once in this project's layout."
    )
    trunk = from_pretrained_checked(
        AutoModel,
        path_or_id,
        allow_pickle_weights=allow_pickle_weights,
        key_mapping={f"^{re.escape(DSCHAT_TRUNK_PREFIX)}": ""},
        allowed_unexpected={DSCHAT_HEAD_KEY},
        hub_kwargs=hub_kwargs,
        **kwargs,
    )
    return trunk, read_checkpoint_tensor(path_or_id, DSCHAT_HEAD_KEY, allow_pickle_weights, **hub_kwargs)


def _pop_meta(config: PretrainedConfig) -> Any | None:
    """Remove and return the `reward_model` entry of a loaded config (None for a plain checkpoint).

    The saved entry describes the file that was loaded, not the live model, so it must not stay on the
    config where a later save could write a stale copy."""
    meta = getattr(config, CONFIG_KEY, None)
    if meta is not None:
        delattr(config, CONFIG_KEY)
    return meta


def _assemble(
    cls: type[RewardModel],
    backbone: PreTrainedModel,
    path_or_id: str | os.PathLike,
    hub_kwargs: dict,
    dschat_head: torch.Tensor | None = None,
    require_saved_head: bool = False,
) -> RewardModel:
    """Backbone + the saved head and normalisation named in its config, or + DeepSpeed-Chat's v_head
    (1, d) with bias 0, or + a fresh head (a ValueError with `require_saved_head`)."""
    meta = _pop_meta(backbone.config)
    if meta is None and dschat_head is not None:
        return _with_dschat_head(cls(backbone), dschat_head, path_or_id)
    if meta is None and require_saved_head:
        raise ValueError(
            f"{path_or_id}: not a reward model: its config.json has no '{CONFIG_KEY}' entry (what step2_reward "
            "saves) and it is not a DeepSpeed-Chat reward model, so its value head would be random. "
            "Pass the output of step2_reward/main.py."
        )
    if meta is None:
        return cls(backbone)
    where = f"{path_or_id}/config.json [{CONFIG_KEY}]"
    if not isinstance(meta, dict) or "value_head" not in meta:
        raise ValueError(f"{where}: expected a dict with a 'value_head' file name, got {meta!r}")
    model = cls(backbone, value_head=_load_head(path_or_id, meta["value_head"], backbone, hub_kwargs))
    try:
        model.set_normalization(
            meta.get("gain", 1.0), meta.get("bias", 0.0), meta.get("normalization_sample", "")
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad normalisation: {e}") from e
    return model


def _with_dschat_head(model: RewardModel, weight: torch.Tensor, path_or_id: str | os.PathLike) -> RewardModel:
    """`model` (a fresh head of the right width and dtype) with DeepSpeed-Chat's v_head weight, bias 0, and
    no normalisation (gain 1, bias 0)."""
    d = model.value_head.in_features
    if tuple(weight.shape) != (1, d):
        raise ValueError(
            f"{path_or_id}: {DSCHAT_HEAD_KEY} has shape {tuple(weight.shape)}, the trunk needs (1, {d})"
        )
    with torch.no_grad():
        model.value_head.weight.copy_(weight)
        model.value_head.bias.zero_()
    model.set_normalization(1.0, 0.0, DSCHAT_SAMPLE)
    return model


def _load_head(
    path_or_id: str | os.PathLike, file_name: str, backbone: PreTrainedModel, hub_kwargs: dict
) -> nn.Linear:
    """The saved Linear(d, 1) head, checked against the backbone's output width, in the backbone's dtype."""
    head_path = cached_file(str(path_or_id), file_name, **hub_kwargs)
    if head_path is None:
        raise FileNotFoundError(
            f"{path_or_id}/config.json [{CONFIG_KEY}]: value head file {file_name!r} not found"
        )
    tensors = load_file(head_path)
    d = _output_dim(backbone)
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or bias is None or tuple(weight.shape) != (1, d) or tuple(bias.shape) != (1,):
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ValueError(f"{head_path}: expected weight (1, {d}) and bias (1,), found {shapes}")
    head = nn.Linear(d, 1, dtype=backbone.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


def load_reward_model(
    path_or_id: str | os.PathLike, dtype: torch.dtype | str | None = None, **hf_kwargs: Any
) -> RewardModel:
    """Same as `RewardModel.from_pretrained`."""
    return RewardModel.from_pretrained(path_or_id, dtype=dtype, **hf_kwargs)


# ------------------------------------------------------------------ training: load, LoRA, save


def load_reward_model_for_training(
    name_or_path: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dtype: torch.dtype = torch.float32,
    dropout: float | None = None,
    ds_config: dict | None = None,
    allow_pickle_weights: bool = False,
    require_saved_head: bool = False,
) -> RewardModel:
    """A RewardModel to train or to run in a DeepSpeed engine, loaded like `common.models.loading.load_causal_lm`.

    name_or_path: a hub id or directory: a causal LM (trunk + fresh head drawn from the global torch RNG,
    so seed it identically on every rank; with `require_saved_head` a ValueError instead, for the reward
    model and critic of stage 3), a saved reward model (trunk + saved head + normalisation), or a
    DeepSpeed-Chat reward model (converted on load: trunk + its v_head, bias 0, no normalisation).
    Trunk weights that do not fit the model are a `common.models.weights.WeightsMismatchError`.
    dropout: overrides every dropout probability of the config before the trunk is built (None keeps it).
    ds_config: the engine's DeepSpeed config; under ZeRO-3 the trunk is built already partitioned (the
    head is left whole: DeepSpeed partitions it when the engine is initialised).
    The input embeddings are resized (to a multiple of 64) when the tokenizer has more tokens than rows,
    and the trunk's config takes the tokenizer's pad/eos/bos ids. Only safetensors weights are read unless
    `allow_pickle_weights`.
    """
    config = load_config(name_or_path, dropout)
    meta = _pop_meta(config)
    with ZeRO3Init(ds_config):
        backbone, dschat_head = _load_trunk(
            name_or_path, allow_pickle_weights, {}, config=config, dtype=dtype, trust_remote_code=False
        )
        if len(tokenizer) > backbone.get_input_embeddings().num_embeddings:
            backbone.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=EMBEDDING_MULTIPLE)
    align_special_tokens(backbone, tokenizer)
    if meta is not None:
        setattr(backbone.config, CONFIG_KEY, meta)  # read (and removed again) by _assemble
    return _assemble(RewardModel, backbone, name_or_path, {}, dschat_head, require_saved_head)


def apply_lora_to_backbone(
    rm: RewardModel, *, lora_dim: int, module_name: str, alpha: float = 1.0, only_optimize_lora: bool = False
) -> RewardModel:
    """Put peft LoRA adapters of rank `lora_dim` on every Linear of the trunk whose name contains
    `module_name` (DeepSpeed-Chat semantics); returns `rm`, whose `backbone` is now a peft model.

    The value head is never adapted and always stays trainable (with `only_optimize_lora` DeepSpeed-Chat
    freezes it too, which leaves a randomly initialised head untrained). Without `only_optimize_lora`
    the trunk's own weights stay trainable as well. `save_reward_model` merges the adapters.
    """
    from peft import LoraConfig, get_peft_model

    backbone = rm.backbone
    cfg = LoraConfig(
        r=lora_dim,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=lora_target_modules(backbone, module_name),
        bias="none",
        fan_in_fan_out=type(backbone).__name__.startswith("GPT2"),  # GPT-2 Conv1D weights are transposed
    )
    rm.backbone = get_peft_model(backbone, cfg)  # no task_type: a plain PeftModel passes kwargs through
    if not only_optimize_lora:
        for p in rm.backbone.parameters():
            p.requires_grad_(True)
    rm.value_head.requires_grad_(True)
    rm._pass_position_ids = _accepts_position_ids(rm.backbone)
    return rm


def _plain_key(key: str) -> str:
    """A RewardModel state-dict key under a peft-wrapped backbone -> the key without peft."""
    prefix = "backbone.base_model.model."
    if not key.startswith(prefix):
        return key
    return "backbone." + key[len(prefix) :].replace(".base_layer.", ".")


def merge_backbone_lora(rm: RewardModel, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold the backbone's LoRA adapters into its weights (W + alpha/r * B @ A); keys become plain
    RewardModel keys. A state dict of a model without LoRA is returned unchanged."""
    peft_config = getattr(rm.backbone, "peft_config", None)
    if not peft_config:
        return state_dict
    cfg = peft_config["default"]
    prefix = "backbone."
    backbone_sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    merged = merge_lora_state_dict(backbone_sd, cfg.lora_alpha / cfg.r, cfg.fan_in_fan_out)
    out = {f"{prefix}{k}": v for k, v in merged.items()}
    out.update({k: v for k, v in state_dict.items() if not k.startswith(prefix)})
    return out
