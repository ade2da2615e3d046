"""Stage 1 end to end on the tiny default: it learns, under ZeRO-3 and ZeRO-0 on 2 CPU ranks, saves a
model that from_pretrained loads with the engine's logits, and LoRA changes only LoRA weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.launch import run_stage

pytestmark = pytest.mark.slow  # stage runs on two ranks

COMMON = [
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "16",
    "--learning_rate",
    "2e-3",
    "--num_train_epochs",
    "1",
    "--max_seq_len",
    "128",
    "--verify_save",
]


@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage", [3])  # ZeRO-0 on two ranks: the two-rank reward-model and PPO runs
def test_sft_learns_and_saves_on_two_ranks(tiny_dir, tmp_path, zero_stage):
    out = tmp_path / f"sft_z{zero_stage}"
    tb = tmp_path / "tb"
    log = run_stage(
        "step1_sft/main.py",
        [
            "--model_name_or_path",
            str(tiny_dir),
            "--output_dir",
            str(out),
            "--zero_stage",
            str(zero_stage),
            "--data_output_path",
            str(tmp_path / "cache"),
            "--enable_tensorboard",
            "--tensorboard_path",
            str(tb),
            *COMMON,
        ],
        num_procs=2,
    )
    metrics = json.loads((out / "sft_metrics.json").read_text())
    first, last = metrics["perplexity_per_epoch"][0], metrics["perplexity_per_epoch"][-1]
    assert last <= 0.5 * first, metrics
    assert metrics["saved_logits_max_abs_diff"] <= 1e-5, metrics
    assert "held-out perplexity" in log
    # A plain Hugging Face directory: safetensors weights, config, generation config, tokenizer.
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).exists(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    assert list(tb.glob("events.out.tfevents.*")), "no TensorBoard events written"


def test_lora_changes_only_lora_weights_and_saves_merged(tiny_dir, tmp_path):
    """Plain `python step1_sft/main.py` (no launcher) with LoRA on the attention projections only, and
    gradient checkpointing (which LoRA needs input gradients for)."""
    out = tmp_path / "sft_lora"
    rank = 4
    run_stage(
        "step1_sft/main.py",
        [
            "--model_name_or_path",
            str(tiny_dir),
            "--output_dir",
            str(out),
            "--data_output_path",
            str(tmp_path / "c"),
            "--lora_dim",
            str(rank),
            "--lora_module_name",
            "self_attn.",
            "--only_optimize_lora",
            "--lora_learning_rate",
            "5e-3",
            "--gradient_checkpointing",
            "--lora_alpha",
            "8",
            *COMMON,
        ],
        num_procs=1,
    )
    before = load_file(tiny_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in after), "LoRA weights must be merged, not saved separately"
    changed = []
    for key, w0 in before.items():
        w1 = after[key]
        if torch.equal(w0, w1):
            continue
        changed.append(key)
        # Only Linear weights inside attention may move, and only by a rank <= r update (B @ A).
        assert "self_attn." in key and key.endswith("proj.weight"), key
        assert torch.linalg.matrix_rank(w1.double() - w0.double(), atol=1e-6) <= rank, key
    assert changed, "LoRA training changed nothing"
    # Loads as a plain transformers model, no peft involved.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "OPTForCausalLM"
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert metrics["saved_logits_max_abs_diff"] <= 1e-5
