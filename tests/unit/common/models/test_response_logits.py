"""`common.models.forward.response_logits`: the LM head runs over the response positions only, and the result (and its
gradient) equals slicing the full-sequence logits, for plain, LoRA and argument-less models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from common.models.forward import position_ids_from_mask, response_logits
from common.models.lora import apply_lora
from common.rl_math import response_positions
from tools.tiny import tiny_config

VOCAB, C, L = 48, 5, 12  # prompt length C, prompt + answer L


class _Vocab:
    """What `tiny_config` reads from a tokenizer: its size and special token ids."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return VOCAB


def _model(arch: str) -> nn.Module:
    """The project's tiny config for `arch` at toy sizes, in eval mode (no dropout; autograd still works)."""
    config = tiny_config(
        arch, _Vocab(), hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=32
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (row 1 has 2 pads) followed by answers (row 0 ends in padding)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, L), generator=g)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, :2] = 0
    mask[0, -3:] = 0
    return ids, mask


def _full(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
    )
    return response_positions(out.logits, C)


def _head_positions(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many positions the output embedding (LM head) was applied to in one response_logits call."""
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    try:
        response_logits(model, ids, mask, C)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("arch", ["opt", "gpt2", "llama"])
def test_equals_sliced_full_logits_and_computes_only_response_positions(arch):
    model, (ids, mask) = _model(arch), _batch()
    got = response_logits(model, ids, mask, C)
    assert got.shape == (2, L - C, VOCAB)
    torch.testing.assert_close(got, _full(model, ids, mask), rtol=1e-5, atol=1e-6)
    assert _head_positions(model, ids, mask) == L - C + 1


def test_gradient_equals_the_full_logits_gradient():
    ids, mask = _batch()
    weights = torch.randn(2, L - C, VOCAB, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (response_logits, lambda m, i, a, c: _full(m, i, a)):
        model = _model("opt")
        (fn(model, ids, mask, C) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_model_takes_the_short_path_too():
    model = apply_lora(_model("opt"), lora_dim=4, module_name="self_attn.", alpha=8.0)
    with torch.no_grad():  # non-zero adapters, so the LoRA path matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids, mask = _batch()
    torch.testing.assert_close(
        response_logits(model, ids, mask, C), _full(model, ids, mask), rtol=1e-5, atol=1e-6
    )
    assert _head_positions(model.get_base_model(), ids, mask) == L - C + 1


class _NoLogitsToKeep(nn.Module):
    """A causal LM whose forward has no `logits_to_keep` (older or custom architectures)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _model("gpt2")

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        return self.inner(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache
        )


class _IgnoresLogitsToKeep(_NoLogitsToKeep):
    def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep=0):
        return super().forward(input_ids, attention_mask, position_ids, use_cache)


@pytest.mark.parametrize("wrapper", [_NoLogitsToKeep, _IgnoresLogitsToKeep])
def test_models_without_the_argument_are_sliced(wrapper):
    model, (ids, mask) = wrapper(), _batch()
    torch.testing.assert_close(response_logits(model, ids, mask, C), _full(model.inner, ids, mask))


@pytest.mark.parametrize("context_len", [0, L])
def test_context_length_out_of_range_is_an_error(context_len):
    ids, mask = _batch()
    with pytest.raises(ValueError, match="context_len"):
        response_logits(_model("opt"), ids, mask, context_len)
