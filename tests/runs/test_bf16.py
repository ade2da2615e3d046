"""Mixed precision: every stage under `--dtype bf16` on CPU, and the tensors that must stay float32.

Under bf16 DeepSpeed casts each model to bfloat16 (8 significant bits). Logits, hidden states and the
optimizer's working copy may be bf16; log-probs, KL, values, rewards, GAE, whitening, scores and losses
must not (common/rl_math/ upcasts half inputs; common/models/reward_model.py's `ValueHead` computes the head in
float32). Three parts:

1. the PPO math and the value head on bf16 inputs give float32 results equal to the float32 computation
   on the same (upcast) inputs, with hand-computed cases where bf16 arithmetic would visibly round;
2. in one process, fp32 (ZeRO-0) and bf16 (actor and critic under ZeRO-2) stage-3 engines built from the
   same tiny models (tests/wiring/test_step3_fidelity.py's fixtures): the bf16 rollout's tensors are float32, KL
   is exactly 0 and the ratio exactly 1 before the first update in both precisions, on the same sampled
   sequences the bf16 log-probs, values, scores and first-iteration rewards are within stated tolerances
   of fp32, and a bf16 ZeRO-2 update (fp32 master weights) is finite and saves models that reload;
3. the real scripts in bf16: stage 1 (ZeRO-0) and stage 2 (ZeRO-2) in one process, stage 3 under ZeRO-3
   on 2 CPU ranks, on a 96/16-row slice of the bundled data; every run finishes with finite losses and
   saves models that reload with from_pretrained.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.models.forward import response_logits
from common.models.reward_model import RewardModel, ValueHead
from common.models.sampling import Samples
from common.models.saving import save_hf_model, save_reward_model
from common.rl_math import (
    entropy_from_logits,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    shape_rewards,
    value_loss,
)
from step3_rlhf.experience import Rollout
from step3_rlhf.ppo_trainer import PPOTrainer
from tests.launch import REPO, run_stage
from tests.wiring.test_step3_fidelity import GEN_BATCHES, Stage, _stage, _train_forward, models  # noqa: F401

pytestmark = pytest.mark.slow  # bf16 runs of every stage

# ------------------------------------------------------------------------- 1. float32 math on bf16 inputs


def _bf16_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, t, v = 3, 6, 11

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    return {
        "logits": randn(b, t, v) * 4,
        "labels": torch.randint(0, v, (b, t), generator=g),
        "logp": randn(b, t) - 3,
        "ref_logp": randn(b, t) - 3,
        "values": randn(b, t),
        "rewards": randn(b, t),
        "scores": randn(b),
        "mask": mask,
    }


def _rl_math_calls(x: dict[str, torch.Tensor]) -> dict[str, object]:
    """Every function of the PPO path applied to `x`; returns their (tensor or tuple) results."""
    m = x["mask"]
    return {
        "logprobs": logprobs_from_logits(x["logits"], x["labels"], 0.7),
        "entropy": entropy_from_logits(x["logits"], 0.7),
        "kl_k1": kl_penalty(x["logp"], x["ref_logp"], "k1"),
        "kl_k3": kl_penalty(x["logp"], x["ref_logp"], "k3"),
        "shape_rewards": shape_rewards(x["scores"], x["rewards"], m, 0.1, clip_score=5.0),
        "gae": gae(x["rewards"], x["values"], m, 1.0, 0.95),
        "whiten": masked_whiten(x["rewards"], m),
        "whiten_scale_only": masked_whiten(x["rewards"], m, shift_mean=False),
        "masked_sum": masked_sum(x["rewards"], m, dim=1),
        "masked_mean": masked_mean(x["rewards"], m),
        "masked_var": masked_var(x["rewards"], m),
        "policy_loss": policy_loss(x["logp"], x["ref_logp"], x["values"], m, 0.2),
        "value_loss": value_loss(x["values"], x["rewards"], x["scores"][:, None].expand_as(m), m, 0.2),
    }


def _flatten(result: object) -> list[torch.Tensor]:
    if torch.is_tensor(result):
        return [result]
    if isinstance(result, dict):
        return [t for v in result.values() for t in _flatten(v)]
    return [t for v in result for t in _flatten(v)]


def test_ppo_math_on_bf16_inputs_is_float32_and_equals_the_upcast_computation():
    """Each function fed bf16 tensors returns float32 results identical to the same call on the inputs
    upcast first. Computing in bf16 and casting the result would differ (bf16 keeps 8 significant bits,
    so e.g. a log-prob of -7.3 moves by up to 0.016) and fail the exact comparison."""
    x = _bf16_inputs()
    upcast = {k: v.float() if v.is_floating_point() else v for k, v in x.items()}
    got, expected = _rl_math_calls(x), _rl_math_calls(upcast)
    for name in got:
        for out, ref in zip(_flatten(got[name]), _flatten(expected[name]), strict=True):
            assert out.dtype == torch.float32, f"{name}: {out.dtype}"
            torch.testing.assert_close(out, ref, atol=0, rtol=0, msg=name)


def test_whitening_bf16_values_by_hand():
    """x = (1, 2, 3) valid and 100 masked: mean 2, population variance 2/3, whitened (-1.2247449, 0,
    1.2247449) = (x - 2) * sqrt(3/2). In bf16 the result would be 1.2265625 (steps of 2^-7 near 1.2)."""
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 1, 0]])
    out = masked_whiten(x, mask, eps=0.0)
    assert out.dtype == torch.float32
    s = math.sqrt(1.5)
    torch.testing.assert_close(out, torch.tensor([[-s, 0.0, s, 0.0]]), atol=1e-6, rtol=0)
    # sum over a row: 256 + 1 + 1 = 258 in float32; bf16 has steps of 2 at 256 and would give 256.
    big = torch.tensor([[256.0, 1.0, 1.0]], dtype=torch.bfloat16)
    assert masked_sum(big, torch.ones(1, 3), dim=1).item() == 258.0


def test_value_head_computes_in_float32_by_hand():
    """A bf16 head with weight (1, 1), bias 0.5 on the bf16 hidden state (256, 1): float32 gives 257.5; a
    bf16 Linear rounds it to 258 (steps of 2 at 256)."""
    head = ValueHead(2, 1, dtype=torch.bfloat16)
    with torch.no_grad():
        head.weight.fill_(1.0)
        head.bias.fill_(0.5)
    hidden = torch.tensor([[[256.0, 1.0]]], dtype=torch.bfloat16)  # (B=1, L=1, d=2)
    out = head(hidden)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 1)
    assert out.item() == 257.5
    assert torch.nn.functional.linear(hidden, head.weight, head.bias).item() == 258.0  # what bf16 would do


def test_loaded_bf16_reward_model_scores_in_float32(models):  # noqa: F811
    """A saved reward model loaded in bf16: its head is a ValueHead (same state-dict keys as a Linear), its
    values and scores are float32 and equal the float32 head applied to the bf16 trunk's hidden states."""
    rm = RewardModel.from_pretrained(models.rm_dir, dtype=torch.bfloat16).eval()
    assert isinstance(rm.value_head, ValueHead) and rm.value_head.weight.dtype == torch.bfloat16
    assert {"value_head.weight", "value_head.bias"} <= set(rm.state_dict())
    batch = models.batches[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        out = rm(ids, mask, normalize=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = rm.backbone(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    assert hidden.dtype == torch.bfloat16
    assert out.values.dtype == out.scores.dtype == torch.float32
    w, b = rm.value_head.weight.float(), rm.value_head.bias.float()
    raw = (hidden.float() @ w.T + b).squeeze(-1).gather(1, out.end_index[:, None]).squeeze(1)
    torch.testing.assert_close(out.scores, raw * rm.gain + rm.bias, atol=1e-6, rtol=0)


# ------------------------------------------------------------ 2. bf16 vs fp32 stage-3 engines, one process

# Tolerances of bf16 against fp32 on the same tokens, tiny OPT (4 layers, d 192). bf16 keeps 8 significant
# bits (relative rounding 2^-9 = 0.2% per weight and activation); through 4 layers the hidden states and
# logits (magnitude ~5) move by about 1e-2, and so do the log-probs (log-softmax is 1-Lipschitz in each
# logit, up to twice the logits' max error). The value head computes in float32 (ValueHead), so values and
# scores carry only the trunk's rounding. Measured maxima (8 rows x 16 tokens, seed 1): log-probs 0.013,
# values 0.030, scores 0.031 with a score std of 0.32 across responses; each tolerance is ~3x that. These
# bound rounding noise; a tensor computed in bf16 where float32 is required is caught exactly by the
# dtype and equality tests above, not by these.
LOGPROB_TOL = 0.04
VALUE_TOL = 0.1  # critic values, normalised units
SCORE_TOL = 0.1  # reward-model scores, normalised units (gain 1.7)
REWARD_TOL = SCORE_TOL  # first iteration: KL is 0, so the rewards are the (clipped) scores


@pytest.fixture(scope="module")
def fp32_stage(models) -> Stage:  # noqa: F811
    return _stage(models)


@pytest.fixture(scope="module")
def bf16_stage(models) -> Stage:  # noqa: F811
    """bf16 engines, actor and critic under ZeRO-2 (the reference and reward model are frozen: ZeRO-0).
    Learning rates 1e-3 so that one update visibly moves bf16 weights. Trained by the last test of this
    section; the tests before it only read."""
    zero2 = ("--actor_zero_stage", "2", "--critic_zero_stage", "2")
    rates = ("--actor_learning_rate", "1e-3", "--critic_learning_rate", "1e-3")
    return _stage(models, "--dtype", "bf16", *zero2, *rates)


def _rollout(stage: Stage, batches: list[dict[str, torch.Tensor]], seed: int) -> Rollout:
    torch.manual_seed(seed)
    return stage.maker.make_rollout(batches)


@pytest.fixture(scope="module")
def rollouts(models, fp32_stage, bf16_stage) -> dict[str, Rollout]:  # noqa: F811
    """fp32 and bf16 rollouts of the first prompt batch (one generation batch: the trainer's micro-batch
    of all rows has the scoring forward's shape), and `bf16_on_fp32`: the bf16 engines' rollout of exactly
    the fp32 rollout's tokens over GEN_BATCHES batches (sampling replaced by those tokens)."""
    out = {
        "fp32": _rollout(fp32_stage, models.batches[:1], 0),
        "bf16": _rollout(bf16_stage, models.batches[:1], 0),
        "fp32_full": _rollout(fp32_stage, models.batches[:GEN_BATCHES], 1),
    }
    samples = iter(_samples_of(out["fp32_full"], models.batches[:GEN_BATCHES]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bf16_stage.maker, "sample", lambda prompts, mask: next(samples))
        out["bf16_on_fp32"] = bf16_stage.maker.make_rollout(models.batches[:GEN_BATCHES])
    return out


def _samples_of(r: Rollout, batches: list[dict[str, torch.Tensor]]) -> list[Samples]:
    """What ExperienceMaker.sample returned for each generation batch of `r`, recovered from the rollout at
    each batch's own prompt width."""
    out, start = [], 0
    for b in batches:
        n, p = b["input_ids"].shape
        rows = slice(start, start + n)
        extra = r.prompt_len - p  # concat_experience left-padded the narrower prompts by this much
        seq = r.seq[rows, extra:].clone()
        attention_mask = r.attention_mask[rows, extra:].clone()
        out.append(Samples(seq, attention_mask, r.action_mask[rows].clone(), r.ends_with_eos[rows], p))
        assert torch.equal(seq[:, :p], b["input_ids"]), "precondition: the rollout keeps the prompt rows"
        start += n
    return out


def test_bf16_engines_are_bf16_and_their_rollout_tensors_float32(bf16_stage, rollouts):
    e = bf16_stage.engines
    for name, engine in (("actor", e.actor), ("ref", e.ref), ("critic", e.critic), ("reward", e.reward)):
        dtypes = {p.dtype for p in engine.module.parameters()}
        assert dtypes == {torch.bfloat16}, f"{name}: {dtypes} (precondition: a bf16 engine)"
    r = rollouts["bf16"]
    for f in fields(Rollout):
        v = getattr(r, f.name)
        if torch.is_tensor(v) and v.is_floating_point():
            assert v.dtype == torch.float32, f"rollout.{f.name} is {v.dtype}"


def test_bf16_logprobs_are_the_float32_log_softmax_of_the_bf16_logits(bf16_stage, rollouts):
    """The rollout's log-probs equal log_softmax(logits.float() / T) of the bf16 actor's logits exactly;
    a log-softmax taken in bf16 would be off by up to ~0.03 (checked: it does differ)."""
    r, t = rollouts["bf16"], bf16_stage.args.temperature
    answer = r.seq[:, r.prompt_len :]
    with torch.no_grad():
        logits = response_logits(bf16_stage.engines.actor, r.seq, r.attention_mask, r.prompt_len)
    assert logits.dtype == torch.bfloat16
    m = r.action_mask.bool()
    expected = torch.log_softmax(logits.float() / t, dim=-1).gather(-1, answer[..., None]).squeeze(-1)
    torch.testing.assert_close(r.logprobs[m], expected[m], atol=1e-6, rtol=0)
    in_bf16 = torch.log_softmax(logits / t, dim=-1).gather(-1, answer[..., None]).squeeze(-1).float()
    assert (in_bf16[m] - expected[m]).abs().max() > 1e-3, "the bf16 log-softmax should round visibly"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kl_is_zero_and_ratio_one_before_the_first_update(
    precision, fp32_stage, bf16_stage, rollouts, monkeypatch
):
    """Reference == actor, so KL is exactly 0; the trainer's first forward on a micro-batch of the scoring
    forward's shape reproduces the rollout's log-probs and values bit for bit, so the ratio is exactly 1."""
    stage = {"fp32": fp32_stage, "bf16": bf16_stage}[precision]
    r = rollouts[precision]
    m = r.action_mask.bool()
    assert torch.equal(r.logprobs, r.ref_logprobs)
    assert torch.equal(r.kl[m], torch.zeros(int(m.sum())))
    mb = r.select(torch.arange(len(r)))
    assert mb.seq.shape == r.seq.shape, "precondition: the micro-batch has the scoring forward's shape"
    logp, values = _train_forward(stage, mb, monkeypatch)
    ratio = torch.exp(logp[m] - mb.logprobs[m])
    assert logp.dtype == values.dtype == torch.float32
    assert torch.equal(ratio, torch.ones_like(ratio)), (logp - mb.logprobs)[m].abs().max()
    assert torch.equal(values[m], mb.values[m])


def test_bf16_tracks_fp32_on_the_same_tokens(rollouts):
    """The bf16 engines' log-probs, values, scores and first-iteration rewards on the fp32 rollout's own
    tokens (8 rows, 16-token answers) are within the tolerances above of the fp32 ones; the scores' bf16 error
    stays well below their spread across responses (measured: a tenth of the std)."""
    r32, r16 = rollouts["fp32_full"], rollouts["bf16_on_fp32"]
    assert torch.equal(r16.seq, r32.seq) and torch.equal(r16.action_mask, r32.action_mask)
    m = r32.action_mask.bool()
    diffs = {
        "logprobs": (r16.logprobs - r32.logprobs)[m].abs().max().item(),
        "values": (r16.values - r32.values)[m].abs().max().item(),
        "scores": (r16.scores - r32.scores).abs().max().item(),
        "rewards": (r16.rewards - r32.rewards)[m].abs().max().item(),
    }
    print(f"bf16 vs fp32 on the same tokens, max |diff|: {diffs}; score std {r32.scores.std().item():.3f}")
    assert diffs["logprobs"] <= LOGPROB_TOL, diffs
    assert diffs["values"] <= VALUE_TOL, diffs
    assert diffs["scores"] <= SCORE_TOL, diffs
    assert diffs["rewards"] <= REWARD_TOL, diffs
    assert diffs["scores"] < 0.3 * r32.scores.std().item(), diffs  # measured: 0.1 x the std
    assert torch.equal(r16.kl[m], torch.zeros(int(m.sum()))), "first iteration: KL exactly 0 in bf16 too"


def test_bf16_zero2_update_is_finite_and_saves_models_that_reload(models, bf16_stage, rollouts, tmp_path):  # noqa: F811
    """Trains the shared bf16 engines (so it comes last in this section): one PPOTrainer.train on the bf16
    rollout (2 epochs, one optimizer step each) gives finite losses; ZeRO-2 keeps float32 master weights;
    the actor's bf16 weights move; the saved actor reloads in bf16 with the engine's logits exactly, and the
    saved critic reloads with float32 values equal to the engine's."""
    e, tok = bf16_stage.engines, models.tok
    assert all(p.dtype == torch.float32 for p in e.actor.optimizer.single_partition_of_fp32_groups)
    before = {k: v.detach().clone() for k, v in e.actor.module.named_parameters()}
    stats = PPOTrainer(e, bf16_stage.args, None, zero3_actor=False).train(rollouts["bf16"])
    print(f"bf16 ZeRO-2 update: { ({k: round(v, 4) for k, v in stats.items()}) }")
    for key in ("policy_loss", "value_loss", "entropy", "approx_kl"):
        assert math.isfinite(stats[key]), (key, stats)
    moved = [k for k, v in e.actor.module.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert len(moved) > len(before) // 2, f"only {len(moved)} of {len(before)} bf16 tensors moved"

    save_hf_model(e.actor, tmp_path / "actor", tok, zero_stage=2)
    save_reward_model(e.critic, tmp_path / "critic", tok, zero_stage=2)
    r = rollouts["bf16"]
    with torch.no_grad():
        engine_logits = response_logits(e.actor, r.seq, r.attention_mask, r.prompt_len)
        engine_values = e.critic(r.seq, r.attention_mask).values
        actor = AutoModelForCausalLM.from_pretrained(tmp_path / "actor").eval()
        assert actor.dtype == torch.bfloat16
        torch.testing.assert_close(
            response_logits(actor, r.seq, r.attention_mask, r.prompt_len), engine_logits, atol=0, rtol=0
        )
        critic = RewardModel.from_pretrained(tmp_path / "critic").eval()
        values = critic(r.seq, r.attention_mask).values
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, engine_values, atol=0, rtol=0)


# ------------------------------------------------------------------------ 3. the stage scripts in bf16

BF16 = ["--dtype", "bf16", "--data_split", "1,1,1"]  # 32 training rows per stage


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """The first 96 training and 16 test rows of the bundled data, as a local dataset directory."""
    root = tmp_path_factory.mktemp("bf16_data")
    for name, rows in (("train.jsonl", 96), ("test.jsonl", 16)):
        lines = (REPO / "data" / "synthetic" / name).read_text().splitlines()[:rows]
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def _data_flags(small_data: Path, cache: Path) -> list[str]:
    return ["--data_path", str(small_data), "--data_output_path", str(cache), *BF16]


@pytest.fixture(scope="module")
def sft_run(tiny_dir, small_data, tmp_path_factory) -> Path:
    """Stage 1 in bf16, ZeRO-0, one process: 4 optimizer steps of 8 sequences of at most 48 tokens."""
    root = tmp_path_factory.mktemp("bf16_runs")
    run_stage(
        "step1_sft/main.py",
        [
            *("--model_name_or_path", str(tiny_dir), "--output_dir", str(root / "sft")),
            *_data_flags(small_data, root / "cache"),
            *("--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16"),
            *("--learning_rate", "2e-3", "--num_train_epochs", "1", "--max_seq_len", "48", "--verify_save"),
        ],
        num_procs=1,
    )
    return root


@pytest.fixture(scope="module")
def rm_run(sft_run, small_data) -> Path:
    """Stage 2 in bf16, ZeRO-2, one process, from the bf16 stage-1 model: 4 optimizer steps of 8 pairs;
    normalisation on 8 samples of the stage-1 policy (bf16 generation)."""
    root = sft_run
    run_stage(
        "step2_reward/main.py",
        [
            *("--model_name_or_path", str(root / "sft"), "--output_dir", str(root / "rm")),
            *_data_flags(small_data, root / "cache"),
            *(
                "--zero_stage",
                "2",
                "--per_device_train_batch_size",
                "8",
                "--per_device_eval_batch_size",
                "16",
            ),
            *("--learning_rate", "2e-3", "--max_seq_len", "48", "--verify_save"),
            *("--normalization_policy_path", str(root / "sft"), "--normalization_num_samples", "8"),
            *("--normalization_max_new_tokens", "8"),
        ],
        num_procs=1,
    )
    return root


def test_stage1_bf16_learns_and_saves_a_bf16_model_that_reloads(sft_run, tiny_dir):
    """Held-out perplexity falls (the untrained model is near-uniform over the ~1650-token vocabulary, so
    even 4 steps more than halve it); the saved weights are bf16 and, reloaded in bf16, give the engine's
    logits exactly."""
    metrics = json.loads((sft_run / "sft" / "sft_metrics.json").read_text())
    first, last = metrics["perplexity_per_epoch"][0], metrics["perplexity_per_epoch"][-1]
    print(f"bf16 stage 1: perplexity {first:.1f} -> {last:.1f}")
    assert math.isfinite(last) and last < 0.5 * first, metrics
    assert metrics["saved_logits_max_abs_diff"] == 0.0, metrics
    model = AutoModelForCausalLM.from_pretrained(sft_run / "sft")
    assert model.dtype == torch.bfloat16
    tiny = AutoModelForCausalLM.from_pretrained(tiny_dir)
    key = "model.decoder.layers.0.fc1.weight"
    assert not torch.equal(model.state_dict()[key].float(), tiny.state_dict()[key].to(torch.bfloat16).float())


def test_stage2_bf16_trains_and_saves_a_reward_model_that_reloads(rm_run):
    """Finite held-out pairwise losses before and after, the saved model scores like the engine, a finite
    normalisation, and the reloaded model's scores are float32 (ValueHead)."""
    metrics = json.loads((rm_run / "rm" / "rm_metrics.json").read_text())
    losses = [point["loss"] for point in metrics["eval_curve"]]
    print(f"bf16 stage 2: held-out loss {losses}, accuracy {[p['accuracy'] for p in metrics['eval_curve']]}")
    assert len(losses) >= 2 and all(math.isfinite(x) for x in losses), metrics["eval_curve"]
    norm = metrics["normalization"]
    assert math.isfinite(norm["gain"]) and norm["gain"] > 0 and math.isfinite(norm["bias"]), norm
    rm = RewardModel.from_pretrained(rm_run / "rm")
    assert rm.backbone.dtype == torch.bfloat16 and isinstance(rm.value_head, ValueHead)
    assert (rm.gain, rm.bias) == pytest.approx((norm["gain"], norm["bias"]))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert rm(ids, torch.ones_like(ids)).scores.dtype == torch.float32


@pytest.mark.distributed
def test_stage3_bf16_zero3_two_ranks(rm_run, small_data, tmp_path):
    """One PPO iteration in bf16, actor and critic under ZeRO-3 on 2 ranks: 2 prompts per rank, 8-token
    answers, one optimizer step of each engine. KL exactly 0 and ratio exactly 1 at the first step (the
    micro-batch is the generation batch), finite losses, an actor that moved and reloads in bf16, a critic
    that reloads with float32 values."""
    root, out = rm_run, tmp_path / "ppo_z3"
    run_stage(
        "step3_rlhf/main.py",
        [
            *(
                "--actor_model_name_or_path",
                str(root / "sft"),
                "--critic_model_name_or_path",
                str(root / "rm"),
            ),
            *("--output_dir", str(out)),
            *_data_flags(small_data, root / "cache"),
            *("--actor_zero_stage", "3", "--critic_zero_stage", "3"),
            *("--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2"),
            *("--max_prompt_seq_len", "32", "--max_answer_seq_len", "8", "--eval_num_prompts", "2"),
            *("--enable_test_mode", "--test_stop_step", "1"),
        ],
        num_procs=2,
    )
    first = json.loads((out / "ppo_metrics.json").read_text())["history"][0]
    shown = {k: first[k] for k in ("score_mean", "kl", "policy_loss", "value_loss")}
    print(f"bf16 stage 3 (ZeRO-3, 2 ranks), first step: {shown}")
    assert first["kl"] == 0.0 and first["ratio_mean"] == 1.0 and first["approx_kl"] == 0.0, first
    for key in ("score_mean", "policy_loss", "value_loss", "entropy"):
        assert math.isfinite(first[key]), (key, first)
    actor = AutoModelForCausalLM.from_pretrained(out / "actor")
    sft = AutoModelForCausalLM.from_pretrained(root / "sft")
    key = "model.decoder.layers.0.fc1.weight"
    assert actor.dtype == torch.bfloat16
    assert not torch.equal(actor.state_dict()[key], sft.state_dict()[key]), "the actor did not move"
    critic = RewardModel.from_pretrained(out / "critic")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert critic(ids, torch.ones_like(ids)).values.dtype == torch.float32
