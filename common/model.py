"""Loading, adapting and saving causal language models, for every stage.

- A hub id and a local directory go through the same `from_pretrained` calls; `trust_remote_code` is off
  unless asked for.
- The tokenizer always gets a pad token distinct from EOS (a pad equal to EOS masks the real EOS out of
  every loss and score): an unused special token of its own when it has one, else an added "<pad>", with
  the embeddings resized to a multiple of 64.
- Under ZeRO-3 the model is created already partitioned (transformers' HfDeepSpeedConfig hook), and
  saving gathers the partitions one parameter at a time onto rank 0.
- LoRA goes through peft; on save the adapters are merged into the weights, so the output is a plain
  Hugging Face model that loads without peft.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import zipfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import cached_file

from common import dist
from common.errors import UserError

PAD_TOKEN = "<pad>"
# Embeddings grown for an added token are padded to a multiple of this (tensor-core and GEMM-friendly).
EMBEDDING_MULTIPLE = 64
# Config attributes that hold dropout probabilities across the architectures we support.
_DROPOUT_ATTRS = (
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "hidden_dropout",
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "summary_first_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
)  # not "layerdrop": it skips whole layers at random, differently on each rank, and ZeRO's collectives then hang


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, apply_chat_template: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has an EOS and a pad token distinct from it (`choose_pad_token`).

    With `apply_chat_template` its chat template must be usable (`common.chat_format`), and the template's
    end-of-turn token becomes the EOS where the two differ."""
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if apply_chat_template:
        from common.chat_format import use_end_of_turn_as_eos

        use_end_of_turn_as_eos(tok, repr(name_or_path))
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {name_or_path!r} has no EOS token; set eos_token in its config")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        pad = choose_pad_token(tok)
        if pad == PAD_TOKEN:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
        else:
            tok.pad_token = pad
    assert tok.pad_token_id != tok.eos_token_id
    return tok


def choose_pad_token(tok: PreTrainedTokenizerBase) -> str:
    """The pad token for a tokenizer that has none, or whose pad is its EOS (SmolLM2, Llama-3, GPT-2...).

    Padding is always masked, so any id other than EOS serves. The tokenizer's own unknown-token is reused
    when it is a special token of its own (not EOS, not BOS, not in the chat template): the vocabulary, the
    embeddings and every model built from them stay as they are (SmolLM2: "<|endoftext|>", id 0). Otherwise
    a new "<pad>" is added and `load_causal_lm` resizes the embeddings to a multiple of 64.
    """
    unk = tok.unk_token
    special = {tok.eos_token, tok.bos_token, tok.pad_token}
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    if unk and unk not in special and tok.unk_token_id is not None and unk not in template:
        return unk
    return PAD_TOKEN


def set_dropout(config: Any, p: float) -> None:
    """Set every dropout probability in a model config to `p` (before the model is built)."""
    for attr in _DROPOUT_ATTRS:
        if isinstance(getattr(config, attr, None), float):
            setattr(config, attr, p)


def disable_dropout(model: nn.Module) -> None:
    """Turn dropout off in a built model: nn.Dropout modules and float `*dropout*` attributes that
    attention layers read at call time."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    if hasattr(model, "config"):
        set_dropout(model.config, 0.0)


class ZeRO3Init:
    """Context in which `from_pretrained` builds a model already partitioned for ZeRO-3."""

    def __init__(self, ds_config: dict | None):
        self.ds_config = ds_config if ds_config and ds_config["zero_optimization"]["stage"] == 3 else None
        self._hf = None

    def __enter__(self):
        if self.ds_config is not None:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf = HfDeepSpeedConfig(self.ds_config)  # registers itself through a weak reference
        return self

    def __exit__(self, *exc):
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        self._hf = None


def load_config(name_or_path: str, dropout: float | None = None, trust_remote_code: bool = False):
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if dropout is not None:
        set_dropout(config, dropout)
    return config


def load_causal_lm(
    name_or_path: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dtype: torch.dtype = torch.float32,
    dropout: float | None = None,
    ds_config: dict | None = None,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
) -> nn.Module:
    """Load an AutoModelForCausalLM consistent with `tokenizer` (embeddings resized, pad/eos ids set).

    `ds_config` is the DeepSpeed config the model will be trained or run with; under ZeRO-3 the model
    is partitioned as it is built instead of being materialised whole on every rank. Only safetensors
    weights are read unless `allow_pickle_weights` (pytorch_model.bin is then read when there are none).
    A checkpoint whose weights do not fit the model is a WeightsMismatchError (`from_pretrained_checked`).
    """
    config = load_config(name_or_path, dropout, trust_remote_code)
    with ZeRO3Init(ds_config):
        model = from_pretrained_checked(
            AutoModelForCausalLM,
            name_or_path,
            allow_pickle_weights=allow_pickle_weights,
            config=config,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        if len(tokenizer) > _num_embeddings(model):
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=EMBEDDING_MULTIPLE)
    align_special_tokens(model, tokenizer)
    return model


def _num_embeddings(model: nn.Module) -> int:
    emb = model.get_input_embeddings()
    return int(getattr(emb, "num_embeddings", emb.weight.shape[0]))


def align_special_tokens(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the model and generation configs use the tokenizer's pad/eos ids."""
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        if tokenizer.bos_token_id is not None:
            cfg.bos_token_id = tokenizer.bos_token_id


# ------------------------------------------------------------------------------------- checked loading

# DeepSpeed-Chat's step-2 reward model: RewardModel(rwtransformer=<AutoModel trunk>, v_head=Linear(d, 1,
# bias=False)), saved as one state dict (pytorch_model.bin) with the trunk's keys under "rwtransformer.".
DSCHAT_TRUNK_PREFIX = "rwtransformer."
DSCHAT_HEAD_KEY = "v_head.weight"
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_SHOWN_KEYS = 5


class WeightsMismatchError(UserError, ValueError):
    """A checkpoint lacks weights its model needs, or holds weights the model has no place for."""


def from_pretrained_checked(
    auto_class: type,
    name_or_path: str | os.PathLike,
    *,
    allow_pickle_weights: bool = False,
    trunk: bool = False,
    key_mapping: dict[str, str] | None = None,
    allowed_unexpected: Collection[str] = (),
    hub_kwargs: dict | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """`auto_class.from_pretrained(name_or_path, **kwargs)` that never returns a model with random weights.

    transformers fills a parameter the checkpoint lacks with a fresh random init, and drops a checkpoint
    weight the model has no place for, and says so only in a log table. Here either one raises
    WeightsMismatchError naming the path and the keys, except what a model rebuilds or drops by design:
    weights tied to another (the LM head under tie_word_embeddings), buffers (rotary inv_freq, attention
    masks: the constructor computes them), the class's `_keys_to_ignore_on_load_*` patterns; with
    trunk=True (an AutoModel trunk read from a *For...* checkpoint) the checkpoint's task head, i.e. its
    keys outside the base-model prefix (`lm_head.weight` of an untied Llama); and `allowed_unexpected`,
    keys the caller reads itself. `key_mapping` ({regex: replacement}) renames checkpoint keys on load.

    Under ZeRO-3 (the model built partitioned), transformers reports missing keys but not unexpected ones;
    those are then found from the checkpoint's key names with transformers' own renaming rules, on every
    rank, so every rank raises. Only safetensors are read unless `allow_pickle_weights`. `hub_kwargs`
    (revision, cache_dir, ...) locate the files.
    """
    hub_kwargs = hub_kwargs or {}
    with _without_load_report():  # what it reports is checked below, and raised with the path
        model, info = auto_class.from_pretrained(
            name_or_path,
            output_loading_info=True,
            key_mapping=key_mapping,
            use_safetensors=None if allow_pickle_weights else True,
            **hub_kwargs,
            **kwargs,
        )
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    missing = {key for key in info["missing_keys"] if key in parameters}
    if is_deepspeed_zero3_enabled():
        keys = checkpoint_keys(name_or_path, allow_pickle_weights, **hub_kwargs)
        unexpected = _zero3_unexpected_keys(model, keys, key_mapping)
    else:
        unexpected = set(info["unexpected_keys"])
    unexpected -= set(allowed_unexpected)
    if trunk and unexpected:
        keys = checkpoint_keys(name_or_path, allow_pickle_weights, **hub_kwargs)
        unexpected = _without_task_head(unexpected, model.base_model_prefix, keys)
    if missing or unexpected:
        raise WeightsMismatchError(_mismatch_message(str(name_or_path), model, missing, unexpected))
    if key_mapping and hasattr(model, "_weight_conversions"):
        del model._weight_conversions  # transformers would save under the checkpoint's names again
    return model


@contextlib.contextmanager
def _without_load_report() -> Iterator[None]:
    """Leave out transformers' LOAD REPORT warning when it lists only missing / unexpected keys: on a load
    that passes the checks they are what is dropped by design ("UNEXPECTED lm_head.weight"), and a real
    mismatch is raised with the path and keys instead. A report of wrong shapes or failed conversions stays:
    transformers raises after it, pointing to it."""
    report_logger = logging.getLogger("transformers.modeling_utils")

    def no_report(record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return "LOAD REPORT" not in text or "MISMATCH" in text or "CONVERSION" in text

    report_logger.addFilter(no_report)
    try:
        yield
    finally:
        report_logger.removeFilter(no_report)


def is_dschat_reward_layout(keys: Collection[str]) -> bool:
    """Whether checkpoint keys are DeepSpeed-Chat's reward model: `rwtransformer.*` and `v_head.weight`."""
    return (
        DSCHAT_HEAD_KEY in keys
        and len(keys) > 1
        and all(key == DSCHAT_HEAD_KEY or key.startswith(DSCHAT_TRUNK_PREFIX) for key in keys)
    )


def _zero3_unexpected_keys(
    model: PreTrainedModel, keys: set[str], key_mapping: dict[str, str] | None
) -> set[str]:
    """Checkpoint keys that land on no weight of `model`, renamed as transformers' ZeRO-3 loader renames
    them (key_mapping, the model's conversion rules, the base-model prefix added or stripped) and filtered
    by the same ignore rules it applies without ZeRO-3."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    from transformers.utils.loading_report import LoadStateDictInfo

    expected = dict.fromkeys(model.state_dict(), True)
    mapping = get_model_conversion_mapping(model, key_mapping)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    prefix = model.base_model_prefix

    def lands(key: str) -> bool:
        renamed, _ = rename_source_key(
            key, renamings, converters, base_model_prefix=prefix, meta_state_dict=expected
        )
        return renamed in expected

    unexpected = {key for key in keys if not lands(key)}
    info = LoadStateDictInfo(set(), unexpected, set(), [], {}, set())
    model._adjust_missing_and_unexpected_keys(info)  # rotary inv_freq, position_ids, _keys_to_ignore_*
    return info.unexpected_keys


def _without_task_head(unexpected: set[str], prefix: str, keys: set[str]) -> set[str]:
    """`unexpected` less the task head of a *For...* checkpoint (its keys are `<prefix>.<trunk key>` plus
    the head's): a trunk drops that head by design. A checkpoint with no prefixed key is a bare trunk, and
    anything unexpected in it is a real mismatch."""
    if not prefix or not any(key.startswith(f"{prefix}.") for key in keys):
        return unexpected
    return {key for key in unexpected if key.startswith(f"{prefix}.")}


def _mismatch_message(name_or_path: str, model: nn.Module, missing: set[str], unexpected: set[str]) -> str:
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} weights of the model are not in it ({_some(missing)}): they would be random"
        )
    if unexpected:
        parts.append(
            f"{len(unexpected)} weights in it have no place in the model ({_some(unexpected)}): they would be "
            "dropped"
        )
    message = f"{name_or_path}: its weights do not fit {type(model).__name__}: {'; '.join(parts)}"
    if is_dschat_reward_layout(unexpected):
        message += (
            ". It is a DeepSpeed-Chat reward model (rwtransformer.*, v_head.weight): pass it as a reward model "
            "or critic (converted on load), or convert it once with `python -m common.convert_dschat SRC DST`"
        )
    return message


def _some(keys: Collection[str]) -> str:
    shown = sorted(keys)[:_SHOWN_KEYS]
    return ", ".join(shown) + (", ..." if len(keys) > _SHOWN_KEYS else "")


def checkpoint_keys(
    name_or_path: str | os.PathLike, allow_pickle_weights: bool = False, **hub_kwargs: Any
) -> set[str]:
    """Names of the weights in a checkpoint (the file `from_pretrained` would read), without loading them:
    the safetensors header or the shard index; a pickle file is memory-mapped when it can be."""
    path = _weights_file(name_or_path, allow_pickle_weights, hub_kwargs)
    if path.endswith(".index.json"):
        return set(json.loads(Path(path).read_text())["weight_map"])
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    return set(_load_pickle(path))


def read_checkpoint_tensor(
    name_or_path: str | os.PathLike, key: str, allow_pickle_weights: bool = False, **hub_kwargs: Any
) -> torch.Tensor:
    """One weight of a checkpoint, read on its own (from its shard, for a sharded checkpoint)."""
    path = _weights_file(name_or_path, allow_pickle_weights, hub_kwargs)
    if path.endswith(".index.json"):
        shard = json.loads(Path(path).read_text())["weight_map"][key]
        path = cached_file(str(name_or_path), shard, **hub_kwargs)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return f.get_tensor(key)
    return _load_pickle(path)[key]


def _weights_file(name_or_path: str | os.PathLike, allow_pickle_weights: bool, hub_kwargs: dict) -> str:
    """The weights file (or shard index) `from_pretrained` reads, in its order of preference."""
    names = SAFETENSORS_WEIGHTS + (PICKLE_WEIGHTS if allow_pickle_weights else ())
    for name in names:
        path = cached_file(str(name_or_path), name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path is not None:
            return path
    refused = (
        ""
        if allow_pickle_weights
        else " (pickle weights, pytorch_model.bin, only with --allow_pickle_weights)"
    )
    raise FileNotFoundError(f"{name_or_path}: no weights file ({', '.join(names)}){refused}")


def _load_pickle(path: str) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin state dict, tensors only (weights_only), memory-mapped unless the file predates
    torch's zip format, so reading its key names or one tensor does not read the whole file."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B, L) positions counting real tokens only, so padding on either side
    leaves absolute-position models (GPT-2, OPT) unchanged. Pads get position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_len: int
) -> torch.Tensor:
    """Run a causal LM (engine, peft or plain model) on prompt+response and return only the logits that
    predict the response: (B, L - C, V), equal to `rl_math.response_positions(model(...).logits, C)`.

    input_ids and attention_mask (B, L); the prompt is the first C = `context_len` positions. Models that
    take `logits_to_keep` (transformers' causal LMs) apply the vocabulary projection to the last L - C + 1
    positions only: for prompt 256 / answer 256 that halves the largest activation of the PPO forwards
    and drops the LM head's work over the prompt. Other models compute all positions and are sliced.
    The logits keep the model's dtype (bf16 under --dtype bf16, to spare memory): `rl_math`'s log-probs
    and entropy upcast them to float32 before the log-softmax.
    """
    length = input_ids.shape[1]
    if not 1 <= context_len < length:
        raise ValueError(f"response_logits: context_len must be in [1, {length - 1}], got {context_len}")
    kw = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "use_cache": False,
    }
    keep = length - context_len + 1  # positions C-1 .. L-1; the last one predicts past the sequence
    if _takes_logits_to_keep(model):
        kw["logits_to_keep"] = keep
    logits = model(**kw).logits
    if logits.shape[1] == keep:
        return logits[:, :-1]
    if logits.shape[1] == length:  # the model accepted the argument but ignored it
        return logits[:, context_len - 1 : length - 1]
    raise RuntimeError(f"response_logits: the model returned {logits.shape[1]} positions for {length} tokens")


def _takes_logits_to_keep(model: nn.Module) -> bool:
    model = _unwrap(model)
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32. logits (B, L, V), labels (B, L) with -100 = ignore."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100
    )


# ----------------------------------------------------------------------------------------------- LoRA


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


# --------------------------------------------------------------------------------------------- saving


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


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DeepSpeed engine -> model


def plain_state_dict(model: nn.Module, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Rank-0 state dict of `model` (engine or module) in plain Hugging Face naming, LoRA merged."""
    model = _unwrap(model)
    sd = gathered_state_dict(model, zero_stage)
    if sd is None:
        return None
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        cfg = peft_config["default"]
        sd = merge_lora_state_dict(sd, cfg.lora_alpha / cfg.r, cfg.fan_in_fan_out)
    return sd


def base_config(model: nn.Module):
    model = _unwrap(model)
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
        inner = _unwrap(model)
        gen = getattr(
            inner.get_base_model() if hasattr(inner, "get_base_model") else inner, "generation_config", None
        )
        if gen is not None:
            gen.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    dist.barrier()


def trainable_parameter_names(model: nn.Module) -> Iterable[str]:
    return [n for n, p in _unwrap(model).named_parameters() if p.requires_grad]


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
