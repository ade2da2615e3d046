"""The shared model layer, DeepSpeed config builder, argument groups and loaders (no launcher needed)."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

from common import args as cli
from common.models.forward import causal_lm_loss, position_ids_from_mask
from common.models.loading import disable_dropout, load_causal_lm, load_tokenizer
from common.models.lora import apply_lora, lora_target_modules, merge_lora_state_dict
from common.training.ds_config import eval_config, resolve_dtype, train_config
from common.training.engines import _EvalShard


def test_load_tokenizer_adds_dedicated_pad_when_pad_is_eos(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.pad_token = tok.eos_token  # the DeepSpeed-Chat defect: pad == eos
    tok.save_pretrained(tmp_path / "tok")
    fixed = load_tokenizer(str(tmp_path / "tok"))
    assert fixed.pad_token_id is not None and fixed.pad_token_id != fixed.eos_token_id
    assert fixed.pad_token == "<pad>"


def test_load_causal_lm_resizes_embeddings_for_new_pad(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<extra_a>", "<extra_b>"]})
    model = load_causal_lm(str(tiny_dir), tok, dropout=0.0)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows >= len(tok) and rows % 64 == 0 and rows - len(tok) < 64  # a GEMM-friendly multiple
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.config.dropout == 0.0


def test_position_ids_ignore_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]])
    assert torch.equal(position_ids_from_mask(mask), expected)


def test_causal_lm_loss_matches_hf_builtin_loss():
    torch.manual_seed(0)
    model = OPTForCausalLM(
        OPTConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            dropout=0.0,
        )
    )
    ids = torch.randint(0, 50, (3, 7))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(input_ids=ids, labels=labels)
    assert torch.allclose(causal_lm_loss(out.logits, labels), out.loss, atol=1e-6)


def _tiny(arch: str):
    torch.manual_seed(0)
    if arch == "opt":
        return OPTForCausalLM(
            OPTConfig(
                vocab_size=40,
                hidden_size=16,
                num_hidden_layers=2,
                ffn_dim=32,
                num_attention_heads=2,
                word_embed_proj_dim=16,
            )
        )
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32))


@pytest.mark.parametrize("arch,module_name", [("opt", "self_attn."), ("gpt2", "attn.")])
def test_merge_lora_state_dict_matches_peft_merge(arch, module_name):
    """Our merge (works on a gathered ZeRO-3 state dict) against peft's own merge_and_unload."""
    model = apply_lora(_tiny(arch), lora_dim=4, module_name=module_name, alpha=8.0, only_optimize_lora=True)
    with torch.no_grad():  # lora_B starts at zero; make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    cfg = model.peft_config["default"]
    ours = merge_lora_state_dict(model.state_dict(), cfg.lora_alpha / cfg.r, cfg.fan_in_fan_out)
    reference = model.merge_and_unload().state_dict()
    assert set(ours) == set(reference)
    for key in reference:
        assert torch.allclose(ours[key], reference[key], atol=1e-6), key


def test_lora_trains_base_weights_too_unless_only_optimize_lora():
    full = apply_lora(_tiny("opt"), lora_dim=2, module_name="self_attn.", only_optimize_lora=False)
    only = apply_lora(_tiny("opt"), lora_dim=2, module_name="self_attn.", only_optimize_lora=True)
    assert all(p.requires_grad for p in full.parameters())
    trainable = [n for n, p in only.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_module_name_matching_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match="matches no Linear layer"):
        lora_target_modules(_tiny("opt"), "no_such_module.")


def test_disabled_dropout_gives_identical_train_mode_forwards():
    model = _tiny("opt")
    model.config.dropout = 0.5
    model = OPTForCausalLM(OPTConfig(**{**model.config.to_dict(), "dropout": 0.5, "attention_dropout": 0.5}))
    model.train()
    ids = torch.randint(0, 40, (2, 9))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout really is on
    disable_dropout(model)
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_train_config_sections():
    cfg = train_config(
        zero_stage=3,
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        world_size=2,
        dtype="bf16",
        offload=True,
        gradient_clipping=0.5,
    )
    assert cfg["train_batch_size"] == 16
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and "fp16" not in cfg
    assert cfg["gradient_clipping"] == 0.5
    z2 = train_config(
        zero_stage=2,
        micro_batch_size=1,
        gradient_accumulation_steps=1,
        world_size=1,
        dtype="fp16",
        offload=True,
    )
    assert z2["zero_optimization"]["offload_param"]["device"] == "none"  # params offload is ZeRO-3 only
    assert z2["fp16"]["enabled"]
    fp32 = train_config(
        zero_stage=0, micro_batch_size=1, gradient_accumulation_steps=1, world_size=1, dtype="fp32"
    )
    assert "fp16" not in fp32 and "bf16" not in fp32


def test_eval_config_collapses_zero_1_2_and_resolves_auto_dtype():
    assert eval_config(zero_stage=2, micro_batch_size=1, world_size=1)["zero_optimization"]["stage"] == 0
    assert eval_config(zero_stage=3, micro_batch_size=1, world_size=1)["zero_optimization"]["stage"] == 3
    expected = "fp32" if not torch.cuda.is_available() else resolve_dtype("auto")
    assert resolve_dtype("auto") == expected


def test_eval_shards_cover_every_row_once_with_equal_lengths():
    data = list(range(11))
    shards = [_EvalShard(data, rank, 4) for rank in range(4)]
    assert len({len(s) for s in shards}) == 1
    real = [item for s in shards for item, is_real in (s[i] for i in range(len(s))) if is_real]
    assert sorted(real) == data


def test_argument_groups_compose_without_copies():
    p = argparse.ArgumentParser()
    cli.add_model_args(p, prefix="actor_")
    cli.add_model_args(p, prefix="critic_")
    cli.add_lora_args(p, prefix="actor_")
    cli.add_lora_args(p, prefix="critic_")
    ns = p.parse_args(
        ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--actor_lora_dim", "8"]
    )
    assert ns.actor_lora_dim == 8 and ns.critic_lora_dim == 0
    assert ns.actor_lora_module_name == ns.critic_lora_module_name == "decoder.layers."


def test_bad_data_split_is_rejected_before_any_work():
    p = argparse.ArgumentParser()
    cli.add_data_args(p, stage=1)
    for bad in ("2,4", "a,b,c", "-1,2,3"):
        with pytest.raises(SystemExit, match="--data_split"):
            cli.check_args(p.parse_args([f"--data_split={bad}"]))


def test_dropout_override_leaves_layerdrop_alone():
    """--dropout 0.1 must not turn on OPT's layerdrop (random layer skipping differs across ranks and hung
    ZeRO-2/3 runs on 2 ranks)."""
    from common.models.loading import set_dropout

    cfg = OPTConfig(layerdrop=0.0)
    set_dropout(cfg, 0.1)
    assert cfg.dropout == 0.1 and cfg.attention_dropout == 0.1
    assert cfg.layerdrop == 0.0


@pytest.mark.parametrize("kind", ["causal_lm", "reward_model"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_cross_checkpointed_blocks(tiny_dir, kind, checkpointing):
    """with_lora_and_checkpointing (stages 1, 2, DPO and the PPO critic): with only the adapters trainable, every
    LoRA B matrix gets a non-zero gradient from one backward, with and without gradient checkpointing."""
    from transformers import AutoModelForCausalLM

    from common.models.loading import load_tokenizer as load_tok
    from common.models.reward_model import RewardModel, load_reward_model_for_training
    from common.training.engines import with_lora_and_checkpointing

    if kind == "reward_model":
        model = load_reward_model_for_training(str(tiny_dir), load_tok(str(tiny_dir)))
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = with_lora_and_checkpointing(
        model,
        lora_dim=4,
        module_name="decoder.layers.",
        alpha=4.0,
        only_optimize_lora=True,
        gradient_checkpointing=checkpointing,
    ).train()
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (2, 12))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    (out.scores if isinstance(model, RewardModel) else out.logits).float().pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(grads) == 24 and all(g is not None and g.abs().sum() > 0 for g in grads)
    frozen = [
        n
        for n, p in model.named_parameters()
        if "lora_" not in n and "value_head" not in n and p.grad is not None
    ]
    assert not frozen, frozen[:3]  # only the adapters (and a reward model's head) train
