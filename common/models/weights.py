"""Reading checkpoint files and checking that a model's weights match them: safetensors (pickle only when
asked for), DeepSpeed-Chat reward-model layouts, and an error that names the missing and unexpected keys.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zipfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    PreTrainedModel,
)
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import cached_file

from common.errors import UserError

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
            "or critic (converted on load), or convert it once with `python -m tools.convert_dschat SRC DST`"
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
