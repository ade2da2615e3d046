"""DPO (step2_dpo/): the loss on real model outputs before any update (DPO, KTO, ORPO, SimPO), the reference
built from a LoRA policy or not at all, KTO's mismatched rows, and the stage run as users run it: two ranks
under ZeRO-3, LoRA with the adapter-disabled reference, a bad row stopped by the data layer, and (from the
demo's stage-1 model) a gain of the held-out gold.

The formulas themselves are pinned in tests/unit/common/test_rl_math.py (preference_loss, pair_response_mask)
and tests/unit/common/test_preference_losses.py (kto_loss, orpo_loss, simpo_loss)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.data import DataConfig, PairCollator, build_stage_data
from common.models.loading import load_tokenizer
from common.rl_math import orpo_loss, simpo_loss
from step2_dpo import main as dpo_main
from step2_dpo.pairs import EXAMPLE_STATS, Reference, dpo_loss, mean_stats, mismatched_rows, response_logps
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
    assert set(stats) == set(EXAMPLE_STATS)
    assert mean_stats(stats)["margin"].abs().item() < 1e-6
    for key in ("chosen_reward", "rejected_reward", "accuracy"):
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


def _args(loss_type: str, **overrides) -> SimpleNamespace:
    return SimpleNamespace(**{**vars(ARGS), "loss_type": loss_type, **overrides})


def _mean_response_logps(model, batch) -> torch.Tensor:
    """Each response's mean log pi(token), computed apart from the stage's code: a log-softmax over the whole
    row, the tokens after the prompt up to the row's last real token."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.double(), dim=-1)
    means = []
    for i in range(batch["input_ids"].shape[0]):
        start, end = int(batch["prompt_lens"][i]), int(batch["attention_mask"][i].sum())
        targets = batch["input_ids"][i, start:end]
        means.append(logp[i, start - 1 : end - 1].gather(-1, targets[:, None]).mean())
    return torch.stack(means)


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_reference_free_losses_take_the_mean_response_log_prob_and_no_reference(
    tiny_dir, pair_batch, loss_type
):
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    args = _args(loss_type, beta=2.0, simpo_gamma=1.0)
    loss, stats = dpo_loss(policy, None, pair_batch, args)  # no reference is ever called
    means = _mean_response_logps(policy, pair_batch)
    if loss_type == "orpo":
        expected, _ = orpo_loss(means[:4], means[4:], beta=2.0)
    else:
        expected, _ = simpo_loss(means[:4], means[4:], beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    assert stats["chosen_reward"].tolist() == pytest.approx((2.0 * means[:4]).tolist(), rel=1e-5)
    assert set(stats) == set(EXAMPLE_STATS)


def test_kto_before_any_update_every_row_has_loss_one_half(tiny_dir, pair_batch):
    """Policy == reference: every r is 0 and the KL estimate is 0, so each row's loss is 1 - sigmoid(0). The
    pair batch read as 8 unpaired rows, the chosen ones desirable; a desirable row's statistics are the
    chosen_* ones, NaN in the rejected_* ones."""
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    rows = {**pair_batch, "desirable": torch.arange(8) < 4}
    args = _args("kto", desirable_weight=1.0, undesirable_weight=1.0)
    loss, stats = dpo_loss(policy, Reference(engine=reference), rows, args)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    assert stats["chosen_reward"][:4].abs().max().item() < 1e-6 and stats["chosen_reward"][4:].isnan().all()
    assert stats["rejected_logp"][:4].isnan().all() and not stats["rejected_logp"][4:].isnan().any()
    assert mean_stats(stats)["margin"].abs().item() < 1e-6
    weighted = _args("kto", desirable_weight=1.0, undesirable_weight=0.5)
    loss, _ = dpo_loss(policy, Reference(engine=reference), rows, weighted)
    assert loss.item() == pytest.approx((0.5 + 0.25) / 2, abs=1e-6)


def test_kto_mismatched_rows_pair_each_prompt_with_the_next_rows_response_by_hand():
    # three rows, width 6: prompts [1 2], [3], [4 5]; responses [6], [7 8 9], [10]
    ids = torch.tensor([[1, 2, 6, 0, 0, 0], [3, 7, 8, 9, 0, 0], [4, 5, 10, 0, 0, 0]])
    attn = (ids > 0).long()
    rows = mismatched_rows({"input_ids": ids, "attention_mask": attn, "prompt_lens": torch.tensor([2, 1, 2])})
    expected = [[1, 2, 7, 8, 9, 0], [3, 10, 0, 0, 0, 0], [4, 5, 6, 0, 0, 0]]
    assert rows["input_ids"].tolist() == expected
    assert rows["attention_mask"].tolist() == (torch.tensor(expected) > 0).long().tolist()
    assert rows["prompt_lens"].tolist() == [2, 1, 2]
    # a response longer than the room after the prompt is cut at the batch's width
    cut = mismatched_rows(
        {"input_ids": ids[:, :4], "attention_mask": attn[:, :4], "prompt_lens": torch.tensor([2, 1, 2])}
    )
    assert cut["input_ids"][0].tolist() == [1, 2, 7, 8]


@pytest.mark.parametrize(("loss_type", "loads"), [("orpo", False), ("simpo", False), ("kto", True)])
def test_only_the_losses_with_a_reference_load_a_second_model(monkeypatch, loss_type, loads):
    loaded = []
    monkeypatch.setattr(dpo_main, "stage_causal_lm", lambda *a, **k: torch.nn.Linear(1, 1))
    monkeypatch.setattr(dpo_main, "stage_engine", lambda model, *a: model)
    monkeypatch.setattr(dpo_main, "load_causal_lm", lambda *a, **k: loaded.append(a) or torch.nn.Linear(1, 1))
    monkeypatch.setattr(dpo_main, "frozen_engine", lambda model, *a: model)
    monkeypatch.setattr(dpo_main, "eval_config", lambda **k: {})
    args = SimpleNamespace(
        loss_type=loss_type, lora_dim=0, only_optimize_lora=False, reference_model_name_or_path=None,
        model_name_or_path="m", zero_stage=0, per_device_train_batch_size=2, dtype="fp32",
        trust_remote_code=False, allow_pickle_weights=False,
    )  # fmt: skip
    _, reference = dpo_main.build_policy_and_reference(args, None, {}, 1)
    assert (reference is not None) == loads and len(loaded) == int(loads)


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


def _from_demo_stage1(demo_stages, out, *flags: str) -> tuple[dict, dict, dict, str]:
    """Run the DPO stage with `flags` from the demo's stage-1 model on the demo's pairs, its held-out answers
    sampled as stage 3 samples them (128 prompts, answer budget 48); print the gold figures and return
    (metrics, before, after, log)."""
    args = [
        *("--model_name_or_path", str(demo_stages / "sft"), "--output_dir", str(out)),
        *("--data_output_path", str(demo_stages / "data_cache"), "--data_split", "4,4,2"),
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
        *flags,
    ]
    log = run_stage(DPO, args, num_procs=1)
    metrics = json.loads((out / "dpo_metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    kl = f", KL {after['kl']:.2f}" if "kl" in after else ""
    print(
        f"{out.name} gold {before['gold_mean']:+.3f} -> {after['gold_mean']:+.3f}, best "
        f"{before['gold_share_best']:.2f} -> {after['gold_share_best']:.2f}, malformed "
        f"{before['gold_share_malformed']:.2f} -> {after['gold_share_malformed']:.2f}{kl}"
    )
    return metrics, before, after, log


def test_lora_dpo_from_the_demo_stage1_model_raises_the_gold(demo_stages, tmp_path):
    """DPO shortened to one epoch, LoRA with the adapter-disabled policy as the reference (no second model),
    from the demo's stage-1 model on the demo's pairs: the held-out gold mean and best share rise over the
    stage-1 policy's (the same 128 prompts and sampling as stage 3's evaluation)."""
    out = tmp_path / "dpo"
    _, before, after, _ = _from_demo_stage1(
        demo_stages,
        out,
        *("--lora_dim", "16", "--lora_alpha", "16", "--lora_module_name", "decoder.layers."),
        *("--only_optimize_lora", "--lora_learning_rate", "5e-4", "--beta", "0.5"),
    )  # measured: gold +0.723 -> +0.765, best 0.46 -> 0.59, malformed 0.01 -> 0.03, KL 0.17
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


# (gold gain, best share gain) the test asserts at least. With these settings from the stage-1 models of seeds
# 1-5 (docs/results.md, "What CI asserts"): ORPO gold +0.087 mean, +0.064 worst, best share +0.175, +0.141
# worst; SimPO gold +0.131, +0.079 worst, best share +0.275, +0.188 worst. The margins are under half the worst.
REFERENCE_FREE_MARGINS = {"orpo": (0.03, 0.07), "simpo": (0.03, 0.08)}


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_reference_free_losses_from_the_demo_stage1_model_raise_the_gold(demo_stages, tmp_path, loss_type):
    """ORPO (lambda 1.0, the tiny script's) and SimPO (the paper's beta 2, gamma 1), one epoch from the demo's
    stage-1 model on the demo's pairs, full fine-tuning and no reference model: the held-out gold mean and best
    share rise over the stage-1 policy's, and the answers have no KL (nothing to measure it against)."""
    metrics, before, after, log = _from_demo_stage1(
        demo_stages,
        tmp_path / loss_type,
        *("--loss_type", loss_type, *(["--beta", "1.0"] if loss_type == "orpo" else [])),
        *("--learning_rate", "2e-5", "--num_train_epochs", "1"),
    )
    assert "kl" not in after and metrics["final_kl"] is None and " kl " not in log
    assert metrics["loss_type"] == loss_type and after["accuracy"] >= before["accuracy"], (before, after)
    gold_margin, best_margin = REFERENCE_FREE_MARGINS[loss_type]
    assert after["gold_mean"] >= before["gold_mean"] + gold_margin, (before, after)
    assert after["gold_share_best"] >= before["gold_share_best"] + best_margin, (before, after)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / loss_type) is not None


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
