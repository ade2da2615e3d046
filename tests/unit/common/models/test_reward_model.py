"""Tests for common/models/reward_model.py: padding invariance, head init, save/load, normalisation
(item numbers: docs/ppo-fidelity.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from common.models.reward_model import (
    HEAD_FILE,
    RewardModel,
    fit_normalization,
    last_token_index,
    load_reward_model,
)

VOCAB = 100
ARCHS = ["opt", "gpt2", "llama"]


def _config(arch: str, d: int = 64):
    if arch == "opt":
        # word_embed_proj_dim != hidden_size: the trunk ends in project_out, so its output width is 32.
        return OPTConfig(
            vocab_size=VOCAB, hidden_size=d, word_embed_proj_dim=d // 2, num_hidden_layers=2, ffn_dim=2 * d,
            num_attention_heads=4, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
            pad_token_id=1, bos_token_id=2, eos_token_id=3,
        )  # fmt: skip
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB, n_embd=d, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=3,
        )  # fmt: skip
    if arch == "llama":
        return LlamaConfig(
            vocab_size=VOCAB, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
            pad_token_id=1, bos_token_id=2, eos_token_id=3,
        )  # fmt: skip
    raise ValueError(arch)


_LM_CLASSES = {"opt": OPTForCausalLM, "gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}


def _tiny_rm(arch: str, seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    rm = RewardModel(AutoModel.from_config(_config(arch)))
    # A fresh head is small (std 1/sqrt(d+1)); make it bigger so score differences are far above 1e-5.
    with torch.no_grad():
        rm.value_head.weight.mul_(10.0)
        rm.value_head.bias.fill_(0.3)
    return rm.eval()


def _pad(ids: torch.Tensor, n_left: int, n_right: int, gen: torch.Generator):
    """Pad a 1-D id sequence with random garbage ids (mask 0); returns (1, L) ids and mask."""
    left = torch.randint(0, VOCAB, (n_left,), generator=gen)
    right = torch.randint(0, VOCAB, (n_right,), generator=gen)
    padded = torch.cat([left, ids, right]).unsqueeze(0)
    mask = torch.cat([torch.zeros(n_left), torch.ones(len(ids)), torch.zeros(n_right)]).long().unsqueeze(0)
    return padded, mask


@pytest.fixture(scope="module", params=ARCHS)
def arch_rm(request):
    return request.param, _tiny_rm(request.param)


SEQ = torch.tensor([5, 17, 42, 8, 99, 23, 3])  # prompt + response + EOS (3)


# ---------------------------------------------------------------- padding invariance (items 4, 9)


@pytest.mark.parametrize("n_pad", [0, 1, 3, 7])
@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_score_and_values_invariant_to_padding(arch_rm, side, n_pad):
    _, rm = arch_rm
    gen = torch.Generator().manual_seed(n_pad)
    with torch.no_grad():
        ref = rm(SEQ.unsqueeze(0), torch.ones(1, len(SEQ), dtype=torch.long))
        n_left = n_pad if side in ("left", "both") else 0
        n_right = n_pad if side in ("right", "both") else 0
        ids, mask = _pad(SEQ, n_left, n_right, gen)
        out = rm(ids, mask)
    assert out.end_index.item() == n_left + len(SEQ) - 1
    torch.testing.assert_close(out.scores, ref.scores, atol=1e-5, rtol=0)
    real = mask[0].bool()
    torch.testing.assert_close(out.values[0, real], ref.values[0], atol=1e-5, rtol=0)
    assert torch.all(out.values[0, ~real] == 0)


def test_mixed_padding_in_one_batch_matches_single_rows(arch_rm):
    _, rm = arch_rm
    gen = torch.Generator().manual_seed(123)
    seqs = [torch.randint(4, VOCAB, (n,), generator=gen) for n in (3, 9, 6, 1)]
    pads = [(7, 1), (0, 2), (3, 2), (4, 6)]  # every row has total length 11
    rows = [_pad(s, left, right, gen) for s, (left, right) in zip(seqs, pads, strict=True)]
    ids = torch.cat([r[0] for r in rows])
    mask = torch.cat([r[1] for r in rows])
    with torch.no_grad():
        batch = rm(ids, mask)
        singles = torch.cat(
            [rm(s.unsqueeze(0), torch.ones(1, len(s), dtype=torch.long)).scores for s in seqs]
        )
    torch.testing.assert_close(batch.scores, singles, atol=1e-5, rtol=0)
    assert batch.end_index.tolist() == [9, 8, 8, 4]


def test_without_position_ids_left_padding_would_change_the_score():
    """Guards the padding tests: GPT-2 really does shift if position_ids are omitted.

    (OPTModel derives its positions from attention_mask when none are given, so it has no such case.)
    """
    rm = _tiny_rm("gpt2")
    rm._pass_position_ids = False
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref = rm(SEQ.unsqueeze(0), torch.ones(1, len(SEQ), dtype=torch.long)).scores
        ids, mask = _pad(SEQ, 3, 0, gen)
        shifted = rm(ids, mask).scores
    assert (shifted - ref).abs().item() > 1e-3


def test_score_read_at_last_valid_token_not_at_last_slot():
    rm = _tiny_rm("gpt2")
    gen = torch.Generator().manual_seed(1)
    ids, mask = _pad(SEQ, 0, 4, gen)
    with torch.no_grad():
        out = rm(ids, mask)
        # An independent path: trunk + head by hand, no mask-derived index.
        hidden = rm.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        head_at_every_slot = rm.value_head(hidden).squeeze(-1)
    last_real = len(SEQ) - 1
    torch.testing.assert_close(out.scores[0], head_at_every_slot[0, last_real], atol=1e-5, rtol=0)
    # Reading at position -1 (a pad slot) gives a different number.
    assert (head_at_every_slot[0, -1] - out.scores[0]).abs().item() > 1e-3


def test_last_token_index():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [4, 2, 2, 4, 0]
    with pytest.raises(ValueError, match=r"rows \[1\] have no valid token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_forward_rejects_mismatched_shapes():
    rm = _tiny_rm("gpt2")
    with pytest.raises(ValueError, match="must both be"):
        rm(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- head (item 10)


def test_fresh_head_init_std_and_zero_bias():
    d = 512
    torch.manual_seed(0)
    # hidden 64 but word_embed_proj_dim 512: the head must follow the trunk's output width, not hidden_size.
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=64, word_embed_proj_dim=d, num_hidden_layers=1, ffn_dim=64,
        num_attention_heads=2, max_position_embeddings=16, dropout=0.0,
    )  # fmt: skip
    rm = RewardModel(AutoModel.from_config(cfg))
    w = rm.value_head.weight
    assert tuple(w.shape) == (1, d)
    expected = 1 / math.sqrt(d + 1)
    assert abs(w.std().item() - expected) < 0.1 * expected
    assert abs(w.mean().item()) < 3 * expected / math.sqrt(d)
    assert torch.all(rm.value_head.bias == 0)
    out = rm(torch.tensor([[4, 5, 6]]), torch.ones(1, 3, dtype=torch.long))
    assert out.values.shape == (1, 3) and out.scores.shape == (1,)


def test_head_width_follows_opt_project_out():
    rm = _tiny_rm("opt")
    assert rm.config.hidden_size == 64
    assert rm.value_head.in_features == 32


# ---------------------------------------------------------------- normalisation (item 11)


def test_fit_normalization_hand_computed():
    gain, bias = fit_normalization(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # mean 2.5, population std sqrt(1.25)
    assert gain == pytest.approx(1 / math.sqrt(1.25), abs=1e-12)
    assert bias == pytest.approx(-2.5 / math.sqrt(1.25), abs=1e-12)
    gain, bias = fit_normalization(torch.tensor([1.0, 3.0]), target_mean=2.0, target_std=4.0)
    assert (gain, bias) == pytest.approx((4.0, -6.0))


def test_fit_normalization_gives_mean_0_std_1():
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(1000, generator=gen) * 5.0 + 3.0
    gain, bias = fit_normalization(raw)
    z = (gain * raw.double() + bias).float()
    assert abs(z.mean().item()) < 1e-5
    assert abs(z.std(unbiased=False).item() - 1) < 1e-5


def test_fit_normalization_rejects_bad_samples():
    with pytest.raises(ValueError, match="std 0"):
        fit_normalization(torch.full((5,), 2.0))
    with pytest.raises(ValueError, match="at least 2"):
        fit_normalization(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        fit_normalization(torch.tensor([1.0, float("nan")]))


def test_normalized_scores_of_the_model():
    rm = _tiny_rm("llama")
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(4, VOCAB, (16, 6), generator=gen)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        raw = rm(ids, mask).scores
        rm.set_normalization(*fit_normalization(raw), "16 random rows")
        norm = rm(ids, mask, normalize=True).scores
        assert torch.equal(rm(ids, mask).scores, raw)  # normalize=False stays raw
    torch.testing.assert_close(norm, raw * rm.gain + rm.bias)
    assert abs(norm.mean().item()) < 1e-5
    assert abs(norm.std(unbiased=False).item() - 1) < 1e-5
    with pytest.raises(ValueError, match="gain > 0"):
        rm.set_normalization(0.0, 1.0, "x")


# ---------------------------------------------------------------- saving and loading


def _batch(seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 8), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip(arch, tmp_path):
    rm = _tiny_rm(arch)
    rm.set_normalization(0.5, -1.25, "test sample")
    rm.save_pretrained(tmp_path / "rm")
    assert (tmp_path / "rm" / "model.safetensors").exists() and (tmp_path / "rm" / HEAD_FILE).exists()
    meta = json.loads((tmp_path / "rm" / "config.json").read_text())["reward_model"]
    assert meta == {
        "value_head": HEAD_FILE,
        "gain": 0.5,
        "bias": -1.25,
        "normalization_sample": "test sample",
    }

    torch.manual_seed(999)  # a different RNG state must not matter: nothing is drawn for a saved head
    loaded = load_reward_model(tmp_path / "rm").eval()
    assert (loaded.gain, loaded.bias, loaded.normalization_sample) == (0.5, -1.25, "test sample")
    assert not hasattr(loaded.config, "reward_model")
    ids, mask = _batch()
    with torch.no_grad():
        for normalize in (False, True):
            torch.testing.assert_close(
                loaded(ids, mask, normalize=normalize).scores, rm(ids, mask, normalize=normalize).scores,
                atol=0, rtol=0,
            )  # fmt: skip
        # The directory is also a plain trunk checkpoint.
        trunk = AutoModel.from_pretrained(tmp_path / "rm").eval()
        torch.testing.assert_close(
            trunk(input_ids=ids).last_hidden_state,
            rm.backbone(input_ids=ids).last_hidden_state,
            atol=0,
            rtol=0,
        )


def test_save_with_tokenizer_and_resave(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "a": 1, "<unk>": 2}, unk_token="<unk>")),
        pad_token="<pad>", unk_token="<unk>",
    )  # fmt: skip
    rm = _tiny_rm("opt")
    rm.save_pretrained(tmp_path / "a", tokenizer=tok)
    assert (tmp_path / "a" / "tokenizer.json").exists()
    loaded = RewardModel.from_pretrained(tmp_path / "a")
    loaded.set_normalization(2.0, 1.0, "second fit")
    loaded.save_pretrained(tmp_path / "b")
    again = RewardModel.from_pretrained(tmp_path / "b")
    assert (again.gain, again.bias, again.normalization_sample) == (2.0, 1.0, "second fit")
    torch.testing.assert_close(again.value_head.weight, rm.value_head.weight, atol=0, rtol=0)


def test_save_with_external_state_dict(tmp_path):
    rm = _tiny_rm("gpt2")
    sd = {k: v.clone() for k, v in rm.state_dict().items()}
    sd["value_head.weight"] *= -2.0
    sd["value_head.bias"].fill_(7.0)
    key = next(k for k in sd if k.startswith("backbone.") and k.endswith("ln_f.weight"))
    sd[key].fill_(0.5)
    rm.save_pretrained(tmp_path / "rm", state_dict=sd)
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    torch.testing.assert_close(loaded.value_head.weight, rm.value_head.weight * -2.0, atol=0, rtol=0)
    assert loaded.value_head.bias.item() == 7.0
    assert torch.all(loaded.state_dict()[key] == 0.5)
    with pytest.raises(ValueError, match=r"missing \['value_head.bias'\]"):
        rm.save_pretrained(
            tmp_path / "bad", state_dict={k: v for k, v in sd.items() if k != "value_head.bias"}
        )


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_plain_causal_lm_gives_same_trunk_and_fresh_head(arch, tmp_path):
    torch.manual_seed(3)
    lm = _LM_CLASSES[arch](_config(arch)).eval()
    lm.save_pretrained(tmp_path / "sft")
    torch.manual_seed(11)
    rm = RewardModel.from_pretrained(tmp_path / "sft").eval()
    torch.manual_seed(11)
    rm_same_seed = RewardModel.from_pretrained(tmp_path / "sft")
    torch.manual_seed(12)
    rm_other_seed = RewardModel.from_pretrained(tmp_path / "sft")

    ids, mask = _batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = lm.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        got = rm.backbone(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert torch.all(rm.value_head.bias == 0) and (rm.gain, rm.bias) == (1.0, 0.0)
    assert torch.equal(rm.value_head.weight, rm_same_seed.value_head.weight)
    assert not torch.equal(rm.value_head.weight, rm_other_seed.value_head.weight)


def test_load_in_bfloat16(tmp_path):
    _tiny_rm("llama").save_pretrained(tmp_path / "rm")
    rm = RewardModel.from_pretrained(tmp_path / "rm", dtype=torch.bfloat16)
    assert rm.backbone.dtype == torch.bfloat16 and rm.value_head.weight.dtype == torch.bfloat16
    ids, mask = _batch()
    out = rm(ids, mask)
    assert out.scores.dtype == torch.float32 and torch.isfinite(out.scores).all()


def test_load_errors_name_the_file(tmp_path):
    rm = _tiny_rm("gpt2")
    rm.save_pretrained(tmp_path / "rm")
    with pytest.raises(ValueError, match="trust_remote_code"):
        RewardModel.from_pretrained(tmp_path / "rm", trust_remote_code=True)

    head_path = tmp_path / "rm" / HEAD_FILE
    head = load_file(head_path)
    save_file({"weight": head["weight"][:, :10].contiguous(), "bias": head["bias"]}, head_path)
    with pytest.raises(ValueError, match=r"value_head\.safetensors: expected weight \(1, 64\)"):
        RewardModel.from_pretrained(tmp_path / "rm")

    rm.save_pretrained(tmp_path / "rm2")
    cfg_path = tmp_path / "rm2" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["reward_model"]["gain"] = "not a number"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json \[reward_model\]: bad normalisation"):
        RewardModel.from_pretrained(tmp_path / "rm2")


# ---------------------------------------------------------------- trainer-facing plumbing


def test_config_gradient_checkpointing_and_train_mode_determinism():
    rm = _tiny_rm("opt")
    assert rm.config is rm.backbone.config
    rm.gradient_checkpointing_enable()
    assert rm.is_gradient_checkpointing
    rm.train()
    ids, mask = _batch()
    a = rm(ids, mask)
    b = rm(ids, mask)
    assert torch.equal(a.values, b.values)  # dropout 0 in the configs: train mode is deterministic
    (a.scores[0] - a.scores[1]).backward()
    assert rm.value_head.weight.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in rm.backbone.parameters())
    rm.gradient_checkpointing_disable()
    assert not rm.is_gradient_checkpointing


def test_folding_normalization_into_head_makes_raw_values_normalised():
    """Step 3 folds gain/bias into the critic's head so its values start in reward units."""
    rm = _tiny_rm("opt")
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(4, VOCAB, (8, 6), generator=gen)
    mask = torch.ones_like(ids)
    rm.set_normalization(0.3, -1.2, "hand-picked")
    with torch.no_grad():
        expected = rm(ids, mask, normalize=True)
        rm.fold_normalization_into_head()
        folded = rm(ids, mask)
    assert (rm.gain, rm.bias) == (1.0, 0.0)
    torch.testing.assert_close(folded.scores, expected.scores, rtol=1e-5, atol=1e-5)
