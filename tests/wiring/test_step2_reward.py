"""Stage-2 building blocks without a launcher: loss, evaluation sums, response masks, the training loader,
LoRA on the backbone and its merge, flag checks, and rw_eval's tokenization, table and CLI (item numbers:
docs/ppo-fidelity.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from common.data import PairCollator, Row, pad_sequences
from common.data import tokenize as data_tokenize
from common.models.reward_model import RewardModel, apply_lora_to_backbone, load_reward_model_for_training
from common.models.saving import reward_state_dict
from common.rl_math import response_mask
from step2_reward import rw_eval
from step2_reward.main import evaluate, pairwise_loss, parse_args
from step2_reward.normalize import resolve_sample

# ------------------------------------------------------------------------------------------- loss


def test_pairwise_loss_hand_computed():
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([1.0, 0.0, 3.0])
    # -log sigmoid(x) = log(1 + exp(-x)) at x = 1, 0, -4
    expected = torch.tensor([math.log1p(math.exp(-1)), math.log(2), math.log1p(math.exp(4))])
    torch.testing.assert_close(pairwise_loss(chosen, rejected), expected)
    # margin 1 shifts x to 0, -1, -5
    expected = torch.tensor([math.log(2), math.log1p(math.e), math.log1p(math.exp(5))])
    torch.testing.assert_close(pairwise_loss(chosen, rejected, margin=1.0), expected)


def test_pairwise_loss_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.5], requires_grad=True)
    rejected = torch.tensor([0.2], requires_grad=True)
    pairwise_loss(chosen, rejected).sum().backward()
    sig = 1 / (1 + math.exp(-0.3))  # d/dx -log sigmoid(x) = sigmoid(x) - 1
    assert chosen.grad.item() == pytest.approx(sig - 1, abs=1e-6)
    assert rejected.grad.item() == pytest.approx(1 - sig, abs=1e-6)


def test_pairwise_loss_is_fp32_for_half_inputs():
    out = pairwise_loss(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([0.0], dtype=torch.bfloat16))
    assert out.dtype == torch.float32


# ------------------------------------------------------------------------------------------- evaluate


class _FakeEngine:
    """Scores each row as its first token id / 10, so the expected metrics can be computed by hand."""

    def __init__(self):
        self.mode_calls = []

    def __call__(self, input_ids, attention_mask):
        from common.models.reward_model import RewardModelOutput

        scores = input_ids[:, 0].float() / 10
        return RewardModelOutput(values=scores[:, None], scores=scores, end_index=scores.long())

    def eval(self):
        self.mode_calls.append("eval")

    def train(self):
        self.mode_calls.append("train")


def _pair_batch(chosen_first: list[int], rejected_first: list[int]) -> dict[str, torch.Tensor]:
    items = [
        {"chosen_input_ids": torch.tensor([c, 9, 9]), "rejected_input_ids": torch.tensor([r, 9])}
        for c, r in zip(chosen_first, rejected_first, strict=True)
    ]
    return PairCollator(pad_token_id=1)(items)


def test_evaluate_sums_real_pairs_only_and_respects_max_batches():
    engine = _FakeEngine()
    loader = [
        (_pair_batch([30, 10], [20, 40]), torch.tensor([True, True])),  # margins +1.0, -3.0
        (_pair_batch([50, 70], [50, 0]), torch.tensor([True, False])),  # margin 0.0 (tie: wrong); placeholder
        (_pair_batch([90], [0]), torch.tensor([True])),  # skipped with max_batches=2
    ]
    m = evaluate(engine, loader, torch.device("cpu"), margin=0.0, max_batches=2)
    assert m["pairs"] == 3
    assert m["accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert m["chosen_mean"] == pytest.approx((3.0 + 1.0 + 5.0) / 3)
    assert m["rejected_mean"] == pytest.approx((2.0 + 4.0 + 5.0) / 3)
    assert m["margin_mean"] == pytest.approx((1.0 - 3.0 + 0.0) / 3)
    loss = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(3.0)) + math.log(2)) / 3
    assert m["loss"] == pytest.approx(loss)
    assert engine.mode_calls == ["eval", "train"]
    assert evaluate(engine, loader, torch.device("cpu"), 0.0, max_batches=0)["pairs"] == 4


# ------------------------------------------------------------------------------------------- normalisation


def test_response_mask_keeps_up_to_first_eos():
    eos = 0
    response = torch.tensor([[5, 0, 7, 0], [5, 6, 7, 8], [0, 1, 1, 1], [4, 4, 0, 1]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]])
    mask, ends = response_mask(response, eos)
    assert torch.equal(mask, expected) and ends.tolist() == [True, False, True, True]


def _args(*extra: str):
    return parse_args(["--model_name_or_path", "x", "--output_dir", "y", *extra])


def test_normalization_sample_resolution_and_flag_checks():
    assert resolve_sample(_args()) == "chosen"
    assert resolve_sample(_args("--normalization_policy_path", "sft")) == "policy"
    assert resolve_sample(
        _args("--normalization_policy_path", "sft", "--normalization_sample", "chosen")
    ) == ("chosen")
    with pytest.raises(SystemExit, match="needs --normalization_policy_path"):
        _args("--normalization_sample", "policy")
    with pytest.raises(SystemExit, match="normalization_max_new_tokens 600"):
        _args("--normalization_policy_path", "sft", "--normalization_max_new_tokens", "600")
    with pytest.raises(SystemExit, match="trust_remote_code"):
        _args("--trust_remote_code")
    defaults = _args()
    assert (defaults.eval_interval, defaults.eval_iters, defaults.margin) == (0, 100, 0.0)
    assert defaults.num_train_epochs == 1 and defaults.lr_scheduler_type == "cosine"  # item 10


# ------------------------------------------------------------------------------------------- loading


def test_training_loader_fresh_head_dropout_and_resize(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    torch.manual_seed(0)
    rm = load_reward_model_for_training(str(tiny_dir), tok, dropout=0.0)
    assert rm.config.dropout == 0.0
    rows = rm.backbone.get_input_embeddings().num_embeddings
    assert rows >= len(tok) and rows % 8 == 0
    d = rm.value_head.in_features
    assert abs(rm.value_head.weight.std().item() - 1 / math.sqrt(d + 1)) < 0.2 / math.sqrt(d + 1)
    assert torch.all(rm.value_head.bias == 0) and (rm.gain, rm.bias) == (1.0, 0.0)
    assert rm.config.pad_token_id == tok.pad_token_id and rm._pass_position_ids


def test_training_loader_reads_a_saved_reward_model(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    torch.manual_seed(1)
    rm = RewardModel.from_pretrained(tiny_dir)
    rm.set_normalization(0.5, 2.0, "sample")
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    torch.manual_seed(2)  # a saved head must not be redrawn
    loaded = load_reward_model_for_training(str(tmp_path / "rm"), tok).eval()
    assert torch.equal(loaded.value_head.weight, rm.value_head.weight)
    assert (loaded.gain, loaded.bias, loaded.normalization_sample) == (0.5, 2.0, "sample")
    assert not hasattr(loaded.config, "reward_model")
    ids = torch.tensor([[5, 6, 7, 0]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, torch.ones_like(ids)).scores, rm.eval()(ids, torch.ones_like(ids)).scores
        )


# ------------------------------------------------------------------------------------------- LoRA


def _lora_rm(tiny_dir, only_optimize_lora: bool = False) -> RewardModel:
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(tiny_dir)
    rm = apply_lora_to_backbone(
        rm, lora_dim=4, module_name="decoder.layers.", alpha=8.0, only_optimize_lora=only_optimize_lora
    )
    with torch.no_grad():  # lora_B starts at 0; make the adapters change the output
        for name, p in rm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return rm.eval()


def test_lora_on_backbone_trainable_sets(tiny_dir):
    rm = _lora_rm(tiny_dir, only_optimize_lora=True)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head.") for n in trainable)
    assert {"value_head.weight", "value_head.bias"} <= trainable  # the head is never frozen
    assert rm._pass_position_ids  # peft's forward(*args, **kwargs) must not hide position_ids
    rm_all = _lora_rm(tiny_dir, only_optimize_lora=False)
    assert all(p.requires_grad for p in rm_all.parameters())


def test_lora_merge_saves_a_plain_model_that_scores_the_same(tiny_dir, tmp_path):
    rm = _lora_rm(tiny_dir)
    ids, mask = pad_sequences([torch.tensor([5, 6, 7, 8, 0]), torch.tensor([9, 10, 0])], 1, "left")
    with torch.no_grad():
        expected = rm(ids, mask).scores
        base = RewardModel(rm.backbone.get_base_model(), rm.value_head)
        with rm.backbone.disable_adapter():
            without_lora = base(ids, mask).scores
    assert (expected - without_lora).abs().max() > 1e-3  # the adapters matter, so the merge is tested
    sd = reward_state_dict(rm, zero_stage=0)
    assert not any("lora_" in k or "base_model.model" in k or "base_layer" in k for k in sd)
    rm.save_pretrained(tmp_path / "a", state_dict=sd)
    rm.save_pretrained(tmp_path / "b")  # no state dict: merged from the module itself
    for name in ("a", "b"):
        assert not (tmp_path / name / "adapter_config.json").exists()
        loaded = RewardModel.from_pretrained(tmp_path / name).eval()
        assert not hasattr(loaded.backbone, "peft_config")
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, mask).scores, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- rw_eval


def test_rw_eval_tokenizes_like_the_data_layer(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompt, chosen = (
        "\n\nHuman: How do I boil an egg?\n\nAssistant:",
        " Boil it for eight minutes. <|endoftext|>",
    )
    rows = [Row(prompt, chosen, " No.", "t")]
    full = data_tokenize.tokenize_pairs(rows, tok, 512)[0]["chosen"][0]
    assert rw_eval.tokenize_pairs(tok, [(prompt, chosen)], 512)[0] == full
    assert full[-1] == tok.eos_token_id and full.count(tok.eos_token_id) == 1  # the text EOS is plain text
    cut = len(full) - 5  # the prompt is cut from the left to fit, the response and EOS stay
    expected = data_tokenize.tokenize_pairs(rows, tok, cut)[0]["chosen"][0]
    got = rw_eval.tokenize_pairs(tok, [(prompt, chosen)], cut)[0]
    assert got == expected == full[5:]
    with pytest.raises(ValueError, match="pair 1: the response is"):
        rw_eval.tokenize_pairs(tok, [(prompt, chosen)], 4)


def test_rw_eval_pairs_and_file_errors(tmp_path):
    assert rw_eval.pairs_from_flags(["p"], ["a", "b"]) == [("p", "a"), ("p", "b")]
    assert rw_eval.pairs_from_flags(["p", "q"], ["a", "b"]) == [("p", "a"), ("q", "b")]
    with pytest.raises(ValueError, match="2 --prompt and 3 --response"):
        rw_eval.pairs_from_flags(["p", "q"], ["a", "b", "c"])
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"prompt": "p", "response": "r"}) + "\n\n" + json.dumps({"prompt": "p"}) + "\n"
    )
    with pytest.raises(ValueError, match=r"pairs\.jsonl:3: field 'response' is missing"):
        rw_eval.read_pairs(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: not valid JSON"):
        rw_eval.read_pairs(path)


def test_rw_eval_main_scores_like_the_model(tiny_dir, tmp_path, capsys):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(tiny_dir)
    with torch.no_grad():
        rm.value_head.weight.mul_(20.0)  # scores far apart, so the 4 printed decimals tell them apart
    rm.set_normalization(2.0, -1.0, "test")
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    pairs = [("\n\nHuman: Hi\n\nAssistant:", " Hello there."), ("\n\nHuman: Tea?\n\nAssistant:", " No.")]
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs)
    )
    rw_eval.main(["--model_name_or_path", str(tmp_path / "rm"), "--input_file", str(tmp_path / "in.jsonl")])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    printed = torch.tensor([[float(r[-2]), float(r[-1])] for r in rows])
    rm.eval()
    with torch.no_grad():
        raw = torch.cat([rm(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).scores
                         for s in rw_eval.tokenize_pairs(tok, pairs, 512)])  # fmt: skip
    torch.testing.assert_close(printed[:, 0], raw, atol=1e-4, rtol=0)
    torch.testing.assert_close(printed[:, 1], 2.0 * raw - 1.0, atol=1e-4, rtol=0)
    with pytest.raises(SystemExit, match="rw_eval: .*missing.jsonl"):
        rw_eval.main(
            ["--model_name_or_path", str(tmp_path / "rm"), "--input_file", str(tmp_path / "missing.jsonl")]
        )
    # a causal LM is not a reward model: its head would be random, so rw_eval refuses it
    with pytest.raises(SystemExit, match="rw_eval: .*not a reward model"):
        rw_eval.main(["--model_name_or_path", str(tiny_dir), "--input_file", str(tmp_path / "in.jsonl")])
