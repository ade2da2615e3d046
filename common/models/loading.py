"""Tokenizer and causal-LM loading for every stage: a hub id and a local directory go through the same
code, a pad token distinct from EOS, dropout set from the config, ZeRO-3 partitioned construction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from common.models.weights import from_pretrained_checked

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

    With `apply_chat_template` its chat template must be usable (`common.data.chat_format`), and the template's
    end-of-turn token becomes the EOS where the two differ."""
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if apply_chat_template:
        from common.data.chat_format import use_end_of_turn_as_eos

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
