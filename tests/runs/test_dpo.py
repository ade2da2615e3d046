"""DPO (step2_dpo/): the loss on real model outputs before any update, the reference built from a LoRA policy,
and the stage run as users run it: two ranks under ZeRO-3, LoRA with the adapter-disabled reference, a bad
row stopped by the data layer, and (from the demo's stage-1 model) a gain of the held-out gold.

The formulas themselves are pinned in tests/unit/common/test_rl_math.py (preference_loss, pair_response_mask)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.data import DataConfig, PairCollator, build_stage_data
from common.models.loading import load_tokenizer
from step2_dpo.pairs import PAIR_STATS, Reference, dpo_loss, response_logps
from tests.launch import REPO, run_failing_stage, run_stage

pytestmark = pytest.mark.slow  # DPO runs

DPO = "step2_dpo/main.py"
ARGS = SimpleNamespace(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, sft_loss_coef=0.0)


@pytest.fixture(scope="module")
def pair_batch(tiny_dir, tmp_path_factory):
    tok = load_tokenizer(str(tiny_dir))
    cfg = DataConfig(
        data_path=[str(REPO / "data" / "synthetic")], data_output_path=str(tmp_path_factory.mktemp("c"))
    )
    data = build_stage_data(cfg, tok, stage=2)
    return PairCollator(tok.pad_token_id)([data.train[i] for i in range(4)])


def test_before_any_update_every_pair_has_loss_log2_and_zero_rewards(tiny_dir, pair_batch):
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    loss, stats = dpo_loss(policy, Reference(engine=reference), pair_batch, ARGS)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert set(stats) == set(PAIR_STATS)
    for key in ("chosen_reward", "rejected_reward", "margin", "accuracy"):
        assert stats[key].abs().max().item() < 1e-6, key
    # the summed log-probs are those of the responses only: a longer response has a lower log-likelihood
    logp, mask = response_logps(policy, pair_batch)
    assert torch.equal(stats["chosen_logp"], (logp * mask)[:4].sum(1).detach())
    assert (mask.sum(1) > 0).all() and (mask.sum(1) < pair_batch["attention_mask"].sum(1) - 1).all()


def test_sft_term_adds_the_chosen_token_mean_nll(tiny_dir, pair_batch):
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ref = Reference(engine=policy)
    plain, _ = dpo_loss(policy, ref, pair_batch, ARGS)
    mixed, _ = dpo_loss(policy, ref, pair_batch, SimpleNamespace(**{**vars(ARGS), "sft_loss_coef": 0.5}))
    logp, mask = response_logps(policy, pair_batch)
    nll = -(logp[:4] * mask[:4]).sum() / mask[:4].sum()
    assert mixed.item() == pytest.approx(plain.item() + 0.5 * nll.item(), rel=1e-6)


def test_reference_is_an_engine_or_a_lora_policy_never_both():
    with pytest.raises(ValueError, match="not both or neither"):
        Reference()
    with pytest.raises(ValueError, match="not both or neither"):
        Reference(engine=torch.nn.Linear(1, 1), adapter_policy=torch.nn.Linear(1, 1))


def _small_run(model: str, out, cache, *extra: str) -> list[str]:
    return [
        *("--model_name_or_path", model, "--output_dir", str(out), "--data_output_path", str(cache)),
        *("--data_split", "1,1,8", "--max_seq_len", "96", "--per_device_train_batch_size", "8"),
        *("--per_device_eval_batch_size", "16", "--eval_iters", "2", "--eval_num_prompts", "8"),
        *(
            "--max_prompt_seq_len",
            "48",
            "--max_answer_seq_len",
            "16",
            "--learning_rate",
            "5e-5",
            "--beta",
            "0.5",
        ),
        *extra,
    ]


@pytest.mark.distributed
def test_two_ranks_zero3_trains_and_saves_a_model_that_loads(demo_stages, tmp_path):
    """Under ZeRO-3 on 2 ranks (the demo's stage-1 model, a 10% slice of pairs: 19 steps): the policy and the
    frozen reference engine, both partitioned. (From the random-init tiny model 19 steps learn nothing
    measurable.) The LoRA reference (the policy with its adapters disabled) is the gold test's below; on 2
    ranks under ZeRO-3 it passed too (48 s, 2026-12-02) and was left out of the suite for time."""
    out = tmp_path / "dpo"
    args = _small_run(
        str(demo_stages / "sft"), out, tmp_path / "cache", "--zero_stage", "3", "--enable_tensorboard"
    )
    log = run_stage(DPO, args)
    metrics = json.loads((out / "dpo_metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert (
        before["loss"] == pytest.approx(math.log(2), abs=1e-5) and before["kl"] == 0.0
    )  # policy == reference
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.6, (before, after)
    assert metrics["gold_reward"] == "common.evaluation.gold:synthetic_gold" and "gold_mean" in after
    rows = [json.loads(line) for line in (out / "heldout_answers.jsonl").read_text().splitlines()]
    assert (
        len(rows) == 8 and {"gold_before", "gold_after"} <= rows[0].keys() and "score_before" not in rows[0]
    )
    assert list((out / "tensorboard").glob("**/events.out.tfevents.*"))
    assert "[dpo] held-out gold" in log
    assert AutoModelForCausalLM.from_pretrained(out) is not None  # gathered from the partitions


def test_lora_dpo_from_the_demo_stage1_model_raises_the_gold(demo_stages, tmp_path):
    """DPO shortened to one epoch, LoRA with the adapter-disabled policy as the reference (no second model),
    from the demo's stage-1 model on the demo's pairs: the held-out gold mean and best share rise over the
    stage-1 policy's (the same 128 prompts and sampling as stage 3's evaluation)."""
    out = tmp_path / "dpo"
    args = [
        *("--model_name_or_path", str(demo_stages / "sft"), "--output_dir", str(out)),
        *("--data_output_path", str(demo_stages / "data_cache"), "--data_split", "4,4,2"),
        *("--lora_dim", "16", "--lora_alpha", "16", "--lora_module_name", "decoder.layers."),
        *("--only_optimize_lora", "--lora_learning_rate", "5e-4", "--beta", "0.5"),
        *(
            "--per_device_train_batch_size",
            "16",
            "--per_device_eval_batch_size",
            "16",
            "--max_seq_len",
            "128",
        ),
        *("--lr_scheduler_type", "constant", "--eval_iters", "4", "--eval_num_prompts", "128"),
        *("--max_prompt_seq_len", "64", "--max_answer_seq_len", "48"),
    ]  # measured: gold +0.723 -> +0.765, best 0.46 -> 0.59, malformed 0.01 -> 0.03, KL 0.17
    run_stage(DPO, args, num_procs=1)
    metrics = json.loads((out / "dpo_metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    print(
        f"DPO gold {before['gold_mean']:+.3f} -> {after['gold_mean']:+.3f}, best {before['gold_share_best']:.2f} "
        f"-> {after['gold_share_best']:.2f}, malformed {before['gold_share_malformed']:.2f} -> "
        f"{after['gold_share_malformed']:.2f}, KL {after['kl']:.2f}"
    )
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA starts as the identity
    assert before["kl"] == 0.0 and after["accuracy"] > 0.75, (before, after)
    # The same run from the stage-1 models of seeds 1-5 and of one more draw of the default seed (docs/results.md,
    # "What CI asserts"): gold gain +0.034 on average, +0.021 in the worst; best share +0.10, worst +0.05; KL at
    # most 0.27. At LoRA lr 1e-3 (before) the gain was larger on those seeds, but another draw over-optimised:
    # gold +0.723 -> +0.704, malformed 0.01 -> 0.12, KL 3.84.
    assert after["gold_mean"] >= before["gold_mean"] + 0.01, (before, after)
    assert after["gold_share_best"] >= before["gold_share_best"] + 0.02, (before, after)
    rows = [json.loads(line) for line in (out / "heldout_answers.jsonl").read_text().splitlines()]
    assert sum(r["gold_after"] for r in rows) / len(rows) == pytest.approx(after["gold_mean"], abs=1e-9)
    saved = AutoModelForCausalLM.from_pretrained(out)  # LoRA merged into a plain model
    assert not any("lora" in name for name, _ in saved.named_parameters())


def test_a_row_whose_chosen_equals_its_rejected_is_refused_naming_it(tiny_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = (REPO / "data" / "synthetic" / "train.jsonl").read_text().splitlines()[:40]
    bad = json.loads(rows[7])
    bad["rejected"] = bad["chosen"]
    rows[7] = json.dumps(bad)
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    args = [
        "--model_name_or_path",
        str(tiny_dir),
        "--output_dir",
        str(tmp_path / "out"),
        "--data_path",
        str(data),
    ]
    proc = run_failing_stage(DPO, [*args, "--data_output_path", str(tmp_path / "cache")])
    assert "train.jsonl line 8" in proc.stderr and "rejected" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out" / "dpo_metrics.json").exists()
