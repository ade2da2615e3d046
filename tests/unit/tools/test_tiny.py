"""The tiny built-in tokenizer and model (tools/tiny.py)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, OPTConfig

from tools.tiny import (
    EOS_TOKEN,
    OWN_FILES,
    PAD_TOKEN,
    build_tiny_model,
    read_bundled_texts,
    train_tokenizer,
    write_tiny,
)

SAMPLES = [
    "\n\nHuman: Hi! How do I cook rice?\n\nAssistant:",
    " Of course! Rinse the rice, use two cups of water per cup, and simmer it covered. Good luck!",
    " Ünïcödé 😀 and a word never seen: xylophone.",
]


@pytest.fixture(scope="module")
def arch_dirs(tiny_dir, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("tiny_archs")
    return {
        "opt": tiny_dir,
        **{arch: write_tiny(base / arch, arch=arch, seed=0) for arch in ("gpt2", "llama")},
    }


def test_pad_and_eos_are_distinct_single_special_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token_id == tok.eos_token_id  # GPT-2 convention; never added automatically
    assert tok.convert_tokens_to_ids(EOS_TOKEN) == tok.eos_token_id
    # Documented choice: the literal strings encode to the single special ids, never split into pieces.
    assert tok("done" + EOS_TOKEN).input_ids[-1:] == [tok.eos_token_id]
    assert tok(EOS_TOKEN).input_ids == [tok.eos_token_id]
    assert tok(PAD_TOKEN).input_ids == [tok.pad_token_id]


def test_tokenizer_adds_no_special_tokens_and_round_trips(tiny_tokenizer):
    tok = tiny_tokenizer
    special = {tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}
    for text in SAMPLES:
        ids = tok(text).input_ids
        assert not special & set(ids), text
        assert tok.decode(ids) == text  # byte-level BPE is lossless, even for unseen characters
    assert (
        tok.decode([tok.pad_token_id, *tok(" Hi").input_ids, tok.eos_token_id], skip_special_tokens=True)
        == " Hi"
    )


def test_tokenizer_is_trained_on_the_bundled_data(tiny_tokenizer):
    tok = tiny_tokenizer
    assert 1000 <= len(tok) <= 2048
    # Frequent words of the data are single tokens; the prompt frame is short.
    assert len(tok(" rice").input_ids) == 1
    assert len(tok("\n\nHuman: How do I cook rice?\n\nAssistant:").input_ids) <= 14
    assert tok.model_max_length == 512


def test_train_tokenizer_respects_vocab_bound():
    texts = list(read_bundled_texts())[:600]
    tok = train_tokenizer(texts, vocab_size=300)
    assert len(tok) == 300
    assert tok.convert_ids_to_tokens([0, 1]) == [EOS_TOKEN, PAD_TOKEN]
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, vocab_size=100)


def test_written_files_are_hf_safetensors(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert names <= OWN_FILES
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)


def test_config_consistent_with_tokenizer(tiny_dir, tiny_tokenizer):
    config = AutoConfig.from_pretrained(tiny_dir)
    assert config.model_type == "opt"
    assert config.vocab_size == len(tiny_tokenizer)
    assert config.pad_token_id == tiny_tokenizer.pad_token_id
    assert config.eos_token_id == tiny_tokenizer.eos_token_id
    assert config.bos_token_id == tiny_tokenizer.bos_token_id
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tiny_tokenizer.eos_token_id
    assert generation["pad_token_id"] == tiny_tokenizer.pad_token_id


@pytest.mark.parametrize(
    ("arch", "default_dropout"),
    [
        ("opt", {"dropout": OPTConfig().dropout, "attention_dropout": OPTConfig().attention_dropout}),
        ("gpt2", {"resid_pdrop": GPT2Config().resid_pdrop, "attn_pdrop": GPT2Config().attn_pdrop}),
        ("llama", {"attention_dropout": LlamaConfig().attention_dropout}),
    ],
)
def test_each_arch_loads_with_from_pretrained(arch_dirs, arch, default_dropout):
    model = AutoModelForCausalLM.from_pretrained(arch_dirs[arch])
    tok = AutoTokenizer.from_pretrained(arch_dirs[arch])
    assert model.config.model_type == arch
    assert model.dtype == torch.float32
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 5_000_000, n_params
    vocab = len(tok)
    assert model.get_input_embeddings().weight.shape[0] == vocab
    assert model.get_output_embeddings().weight.shape[0] == vocab
    for key, value in default_dropout.items():
        assert getattr(model.config, key) == value
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("arch", ["opt", "gpt2", "llama"])
def test_left_padding_with_position_ids_matches_unpadded(arch_dirs, arch):
    model = AutoModelForCausalLM.from_pretrained(arch_dirs[arch]).eval()
    tok = AutoTokenizer.from_pretrained(arch_dirs[arch], padding_side="left")
    batch = tok(SAMPLES, return_tensors="pt", padding=True)
    assert (batch.input_ids[:, 0] == tok.pad_token_id).any()
    position_ids = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(**batch, position_ids=position_ids).logits
        assert torch.isfinite(padded).all()
        for i, text in enumerate(SAMPLES):
            ids = tok(text, return_tensors="pt").input_ids
            alone = model(ids).logits[0]
            torch.testing.assert_close(padded[i, -ids.shape[1] :], alone, atol=1e-4, rtol=1e-4)


def test_generate_with_left_padding_matches_unpadded(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir, padding_side="left")
    prompts = SAMPLES[:1] + ["\n\nHuman: Hi\n\nAssistant:"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, do_sample=False, max_new_tokens=6)
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt").input_ids
        alone = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6)
        assert out[i, batch.input_ids.shape[1] :].tolist() == alone[0, ids.shape[1] :].tolist()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_dir):
    again = write_tiny(tmp_path / "again", arch="opt", seed=0)
    other = write_tiny(tmp_path / "other", arch="opt", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_build_leaves_global_rng_alone(tiny_tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("gpt2", tiny_tokenizer, seed=5, hidden_size=32, num_layers=1, num_heads=2)
    assert torch.equal(torch.rand(3), expected)


def test_sizes_are_applied_and_validated(tiny_tokenizer):
    model = build_tiny_model("llama", tiny_tokenizer, seed=0, hidden_size=64, num_layers=2, num_heads=2)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert model.config.intermediate_size == 192  # 8/3 * 64 rounded up to a multiple of 64
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_model("opt", tiny_tokenizer, seed=0, hidden_size=100, num_heads=3)
    with pytest.raises(TypeError, match="hidden"):
        build_tiny_model("opt", tiny_tokenizer, seed=0, hiden_size=64)
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model("bert", tiny_tokenizer, seed=0)


def test_refuses_foreign_directory_but_overwrites_its_own(tmp_path):
    out = tmp_path / "model"
    write_tiny(out, arch="gpt2", seed=0, hidden_size=32, num_layers=1, num_heads=2)
    assert write_tiny(out, arch="gpt2", seed=0, hidden_size=32, num_layers=1, num_heads=2) == out
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        write_tiny(out, arch="gpt2", seed=0)
    assert (out / "notes.txt").read_text() == "mine"


def test_bad_training_data_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'chosen'"):
        list(read_bundled_texts(path))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        list(read_bundled_texts(path))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(read_bundled_texts(tmp_path / "missing.jsonl"))


def test_cli_writes_a_loadable_model(tmp_path, capsys):
    from tools.tiny import main

    assert main([str(tmp_path / "cli"), "--arch", "gpt2", "--hidden_size", "64", "--num_heads", "2"]) == 0
    assert "gpt2" in capsys.readouterr().out
    config = AutoConfig.from_pretrained(tmp_path / "cli")
    assert (config.model_type, config.n_embd, config.n_head) == ("gpt2", 64, 2)
