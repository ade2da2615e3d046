"""Stage-3 (PPO) wiring on real DeepSpeed engines: the silent-bug table of docs/ppo-fidelity.md.

The formulas themselves are unit-tested in tests/unit/common/test_rl_math.py; here the question is whether
step3_rlhf/ feeds them the right tensors: temperature everywhere, positions from the attention mask,
dropout off, masks after EOS, the score at the EOS, rewards/GAE/whitening over the right tokens,
minibatch bookkeeping, and that an update moves the actor and nothing frozen.

Everything runs in this process as rank 0 of 1, ZeRO-0, fp32, on the tiny default OPT model. Its weights
are random, so it would almost never emit EOS; the actor used here gets a bias towards EOS (a shift of the
final layer norm along the EOS embedding) so that rollouts mix responses that stop early with responses
that hit the length limit. The reward model is a random head on the same trunk with a non-trivial stored
normalisation (gain 1.7, bias 0.3), so a missing normalisation shows up as a wrong score.

Engines are built once per module for the read-only tests; the tests that train use their own engines.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from common import dist, rl_math
from common.args import data_config
from common.data import PromptCollator, build_stage_data
from common.models.forward import position_ids_from_mask
from common.models.loading import load_tokenizer
from common.models.reward_model import RewardModel, load_reward_model_for_training
from common.models.saving import save_reward_model
from common.rl_math import FixedKLController, masked_mean, masked_sum, masked_var, response_mask
from common.rl_math import advantages as rl_advantages
from step3_rlhf import experience as experience_module
from step3_rlhf import ppo_trainer as trainer_module
from step3_rlhf import report as report_module
from step3_rlhf.args import parse_args
from step3_rlhf.engines import Engines, build_engines
from step3_rlhf.experience import Experience, ExperienceMaker, Rollout, concat_experience
from step3_rlhf.ppo_trainer import PPOTrainer, minibatch_schedule
from tools.tiny import build_tiny_model

EOS_LOGIT_BOOST = 3.5  # some of the 16-token responses end with EOS, some not (3.3-3.7 do; 3.0 none, 4.0 all)
RM_GAIN, RM_BIAS = 1.7, 0.3
GEN_BATCH, GEN_BATCHES, MICRO, ACCUM, PPO_EPOCHS = 4, 2, 2, 2, 2
MAX_PROMPT, MAX_ANSWER = 48, 16
ROLLOUT = GEN_BATCH * GEN_BATCHES
OPTIMIZER_STEPS = PPO_EPOCHS * ROLLOUT // (MICRO * ACCUM)  # 4: two minibatches per epoch
SEED = 1234
CLIP, PENALTY = 0.8, -0.5  # reward settings of the training fixture
TOL = 1e-5


# --------------------------------------------------------------------------------------------- fixtures


@dataclass
class Models:
    actor_dir: Path
    rm_dir: Path
    tok: object
    batches: list[dict[str, torch.Tensor]]  # left-padded prompt batches of the bundled data (stage-3 split)
    root: Path


@dataclass
class Stage:
    args: argparse.Namespace
    engines: Engines
    maker: ExperienceMaker


def _argv(root: Path, actor_dir: Path, rm_dir: Path, *extra: str) -> list[str]:
    return [
        *("--actor_model_name_or_path", str(actor_dir), "--critic_model_name_or_path", str(rm_dir)),
        *("--output_dir", str(root / "out"), "--data_output_path", str(root / "cache")),
        *("--per_device_generation_batch_size", str(GEN_BATCH), "--generation_batches", str(GEN_BATCHES)),
        *("--per_device_training_batch_size", str(MICRO), "--gradient_accumulation_steps", str(ACCUM)),
        *("--ppo_epochs", str(PPO_EPOCHS), "--max_prompt_seq_len", str(MAX_PROMPT)),
        *("--max_answer_seq_len", str(MAX_ANSWER), "--dtype", "fp32", "--seed", str(SEED)),
        *extra,
    ]


@pytest.fixture(scope="module")
def models(tiny_dir, tmp_path_factory) -> Iterator[Models]:
    environ = dict(os.environ)
    if dist.is_initialized():  # an earlier module's group (test_bf16 shares this fixture): DeepSpeed still
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")  # wants these
    else:
        dist.init_distributed()
    root = tmp_path_factory.mktemp("step3")
    tok = load_tokenizer(str(tiny_dir))

    actor = AutoModelForCausalLM.from_pretrained(tiny_dir)
    eos_row = actor.get_input_embeddings().weight[tok.eos_token_id].detach()
    with torch.no_grad():  # the LM head is tied: the EOS logit rises by EOS_LOGIT_BOOST everywhere
        actor.model.decoder.final_layer_norm.bias += EOS_LOGIT_BOOST * eos_row / eos_row.norm() ** 2
    actor_dir = root / "actor"
    actor.save_pretrained(actor_dir)
    tok.save_pretrained(actor_dir)

    torch.manual_seed(0)
    rm = load_reward_model_for_training(str(actor_dir), tok)
    rm.set_normalization(RM_GAIN, RM_BIAS, "test fixture")
    rm_dir = root / "rm"
    save_reward_model(rm, rm_dir, tok, 0)

    args = parse_args(_argv(root, actor_dir, rm_dir))
    data = build_stage_data(data_config(args), tok, stage=3)
    collate = PromptCollator(tok.pad_token_id)
    batches = [collate([data.train[i] for i in range(b * GEN_BATCH, (b + 1) * GEN_BATCH)]) for b in range(3)]
    yield Models(actor_dir=actor_dir, rm_dir=rm_dir, tok=tok, batches=batches, root=root)
    # init_distributed's single-process defaults (RANK, MASTER_PORT of this process's store, ...) must not
    # leak into the subprocesses later test modules launch; the process group itself stays up.
    os.environ.clear()
    os.environ.update(environ)


def _stage(m: Models, *extra: str, actor_dir: Path | None = None, rm_dir: Path | None = None) -> Stage:
    args = parse_args(_argv(m.root, actor_dir or m.actor_dir, rm_dir or m.rm_dir, *extra))
    engines = build_engines(args, m.tok, OPTIMIZER_STEPS, OPTIMIZER_STEPS)
    maker = ExperienceMaker(engines, m.tok, args, FixedKLController(args.init_kl_coef), zero3_actor=False)
    return Stage(args=args, engines=engines, maker=maker)


@pytest.fixture(scope="module")
def stage(models) -> Stage:
    """Engines that are never trained (read-only tests)."""
    return _stage(models)


@pytest.fixture(scope="module")
def gpt2_stage(models) -> Stage:
    """Read-only engines of a tiny GPT-2 with the same tokenizer. Unlike OPT, GPT-2 does not derive its
    positions from the attention mask, so only explicit position ids keep its numbers padding-free."""
    actor_dir, rm_dir = models.root / "gpt2", models.root / "gpt2_rm"
    build_tiny_model("gpt2", models.tok, seed=0).save_pretrained(actor_dir)
    models.tok.save_pretrained(actor_dir)
    torch.manual_seed(0)
    rm = load_reward_model_for_training(str(actor_dir), models.tok)
    rm.set_normalization(RM_GAIN, RM_BIAS, "test fixture")
    save_reward_model(rm, rm_dir, models.tok, 0)
    return _stage(models, actor_dir=actor_dir, rm_dir=rm_dir)


@dataclass
class Recorded:
    rollout: Rollout
    parts: list[Experience]  # the generation batches, as concat_experience received them
    whiten_input: torch.Tensor  # what masked_whiten received: the advantages before whitening
    generate_calls: list[dict]  # per part: the kwargs ExperienceMaker passed to generate, and HF's scores


@pytest.fixture(scope="module")
def recorded(models, stage) -> Recorded:
    """One rollout of two generation batches through ExperienceMaker.make_rollout, with intermediate
    results captured on the way: the functions it calls are wrapped, not replaced (generate is asked for
    its processed scores as well, which changes nothing it samples)."""
    seen: dict = {"generate": []}
    real_concat, real_whiten = experience_module.concat_experience, rl_advantages.masked_whiten
    model = stage.engines.actor.module
    real_generate = model.generate

    def record_generate(**kwargs):
        out = real_generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        seen["generate"].append({"kwargs": kwargs, "scores": torch.stack(out.scores, dim=1).float()})
        return out.sequences

    def record_concat(parts, pad_id):
        seen["parts"] = list(parts)
        return real_concat(parts, pad_id)

    def record_whiten(x, mask, shift_mean=True, eps=1e-8):
        seen["whiten_input"] = x.clone()
        return real_whiten(x, mask, shift_mean=shift_mean, eps=eps)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model, "generate", record_generate)
        mp.setattr(experience_module, "concat_experience", record_concat)
        mp.setattr(rl_advantages, "masked_whiten", record_whiten)  # where estimate_advantages finds it
        torch.manual_seed(0)
        rollout = stage.maker.make_rollout(models.batches[:GEN_BATCHES])
    assert "whiten_input" in seen, "make_rollout did not whiten the advantages (--whiten_advantages is on)"
    ends = rollout.ends_with_eos
    assert ends.any() and not ends.all(), f"the fixture needs rows with and without EOS, got {ends.tolist()}"
    return Recorded(
        rollout=rollout,
        parts=seen["parts"],
        whiten_input=seen["whiten_input"],
        generate_calls=seen["generate"],
    )


@dataclass
class Trained:
    stage: Stage
    params_before: dict[str, dict[str, torch.Tensor]]  # engine -> parameter name -> value
    steps: dict[str, tuple[int, int]]  # engine -> (global_steps delta, micro_steps delta)
    stats: dict[str, float]
    after: Rollout  # made by the updated actor


@pytest.fixture(scope="module")
def trained(models) -> Trained:
    """Fresh engines, one rollout, one PPOTrainer.train, then a second rollout from the updated actor.
    Reward settings: --clip_reward_value CLIP --missing_eos_penalty PENALTY."""
    st = _stage(
        models,
        *(
            "--actor_learning_rate",
            "1e-3",
            "--critic_learning_rate",
            "1e-3",
            "--lr_scheduler_type",
            "constant",
        ),
        *("--clip_reward_value", str(CLIP), "--missing_eos_penalty", str(PENALTY)),
    )
    e = st.engines
    engines = {"actor": e.actor, "ref": e.ref, "critic": e.critic, "reward": e.reward}
    params_before = {
        name: {k: v.detach().clone() for k, v in eng.module.named_parameters()}
        for name, eng in engines.items()
    }
    torch.manual_seed(1)
    rollout = st.maker.make_rollout(models.batches[:GEN_BATCHES])
    counters = {n: (engines[n].global_steps, engines[n].micro_steps) for n in ("actor", "critic")}
    stats = PPOTrainer(e, st.args, None, zero3_actor=False).train(rollout)
    steps = {n: (engines[n].global_steps - g, engines[n].micro_steps - m) for n, (g, m) in counters.items()}
    torch.manual_seed(2)
    after = st.maker.make_rollout(models.batches[1 : 1 + GEN_BATCHES])
    return Trained(stage=st, params_before=params_before, steps=steps, stats=stats, after=after)


# ---------------------------------------------------------------------------------------------- helpers


def _rows(r: Rollout) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompt tokens, response tokens) of every row of `r`, all padding removed."""
    out = []
    for i in range(len(r)):
        prompt = r.seq[i, : r.prompt_len][r.attention_mask[i, : r.prompt_len].bool()]
        response = r.seq[i, r.prompt_len :][r.action_mask[i].bool()]
        out.append((prompt, response))
    return out


def _pack(
    rows: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int, extra_left: int = 0, extra_right: int = 0
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-pad the prompts and right-pad the responses of `rows`, `extra_*` columns beyond the longest.
    Returns seq (B, P + R), attention_mask (B, P + R) and P."""
    width_p = max(len(p) for p, _ in rows) + extra_left
    width_r = max(len(r) for _, r in rows) + extra_right
    seqs, masks = [], []
    for p, r in rows:
        left, right = width_p - len(p), width_r - len(r)
        seqs.append(torch.cat([torch.full((left,), pad_id), p, r, torch.full((right,), pad_id)]))
        masks.append(torch.cat([torch.zeros(left), torch.ones(len(p) + len(r)), torch.zeros(right)]))
    return torch.stack(seqs), torch.stack(masks).long(), width_p


class _Captured(Exception):
    """Raised by a patched loss to stop a trainer step after its forward pass, before backward/step."""

    def __init__(self, current: torch.Tensor):
        super().__init__("captured")
        self.current = current


def _train_forward(stage: Stage, mb: Rollout, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The current log-probs and values that PPOTrainer computes for micro-batch `mb`, taken from inside
    actor_step / critic_step: their losses are patched to raise, so nothing is stepped."""

    def capture(current, *rest, **options):
        raise _Captured(current.detach())

    trainer = PPOTrainer(stage.engines, stage.args, None, zero3_actor=False)
    out = []
    for loss_name, step in (("policy_loss", trainer.actor_step), ("value_loss", trainer.critic_step)):
        with monkeypatch.context() as mp:
            mp.setattr(trainer_module, loss_name, capture)
            with pytest.raises(_Captured) as info:
                step(mb)
        out.append(info.value.current)
    return out[0], out[1]


def _params_changed(before: dict[str, torch.Tensor], engine) -> list[str]:
    return [k for k, v in engine.module.named_parameters() if not torch.equal(v.detach(), before[k])]


# ---------------------------------------------------------------------------- 1. KL 0, ratio 1 at start


def test_kl_is_zero_and_ratio_one_before_the_first_update(stage, recorded, monkeypatch):
    """ref == actor, so the rollout's KL is exactly 0. The trainer's first forward (train mode) reproduces
    the rollout's log-probs and values: bit for bit (ratio exactly 1) on a micro-batch with the same shape
    as the scoring forward, and to 1e-5 on 2-row micro-batches (a different shape changes CPU kernels'
    summation order by an ulp). Catches log-probs computed without the temperature on either side (a
    difference of order 1) and dropout."""
    r = recorded.rollout
    mask = r.action_mask.bool()
    assert torch.equal(r.logprobs, r.ref_logprobs)
    assert torch.equal(r.kl[mask], torch.zeros(int(mask.sum())))
    assert stage.engines.actor.training, "the actor should be back in train mode after the rollout"

    # The part with the widest prompts sits unchanged in the concatenated rollout: same shapes as scored.
    k = max(range(len(recorded.parts)), key=lambda j: recorded.parts[j].prompt_len)
    part = recorded.parts[k]
    same_shape = r.select(torch.arange(k * GEN_BATCH, (k + 1) * GEN_BATCH))
    assert same_shape.seq.shape == part.seq.shape, "precondition: the part keeps its shape in the rollout"
    for mb, exact in [(same_shape, True)] + [
        (r.select(torch.tensor(i)), False) for i in ([0, 5], [7, 2], [3, 4])
    ]:
        logp, values = _train_forward(stage, mb, monkeypatch)
        m = mb.action_mask.bool()
        ratio = torch.exp(logp[m] - mb.logprobs[m])
        if exact:
            assert torch.equal(logp[m], mb.logprobs[m]), (logp - mb.logprobs)[m].abs().max()
            assert torch.equal(ratio, torch.ones_like(ratio))
            assert torch.equal(values[m], mb.values[m]), (values - mb.values)[m].abs().max()
        else:
            torch.testing.assert_close(logp[m], mb.logprobs[m], atol=TOL, rtol=0)
            torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=TOL, rtol=0)
            torch.testing.assert_close(values[m], mb.values[m], atol=TOL, rtol=0)


# ------------------------------------------------------------- 2. rollout log-probs == sampling log-probs


def test_rollout_logprobs_match_the_distribution_tokens_were_sampled_from(stage, recorded):
    """ExperienceMaker's own generate calls, with HF's processed scores (temperature applied; top-k/top-p
    off) captured: log_softmax(scores) at the sampled tokens == the rollout's forward log-probs on valid
    positions. Catches an off-by-one in the logits slice and a temperature mismatch."""
    assert len(recorded.generate_calls) == len(recorded.parts) == GEN_BATCHES
    for call, part in zip(recorded.generate_calls, recorded.parts, strict=True):
        kw, scores = call["kwargs"], call["scores"]  # scores (B, R, V)
        config = kw["generation_config"]  # common.models.sampling passes every setting in it
        assert config.do_sample is True and config.temperature == stage.args.temperature == 0.7
        assert config.top_k == 0 and config.top_p == 1.0 and config.repetition_penalty == 1.0
        assert config.max_new_tokens == MAX_ANSWER
        assert "position_ids" not in kw, "generate derives positions itself (docs/ppo-fidelity.md item 4)"
        assert scores.shape[1] == part.action_mask.shape[1]
        sampled = part.seq[:, part.prompt_len :]
        gen_logp = torch.log_softmax(scores, dim=-1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        m = part.action_mask.bool()
        torch.testing.assert_close(part.logprobs[m], gen_logp[m], atol=1e-4, rtol=0)
        # The comparison can tell temperatures apart: untempered log-probs are far from the sampled ones.
        untempered = torch.log_softmax(scores * stage.args.temperature, dim=-1).gather(-1, sampled[..., None])
        assert (untempered.squeeze(-1)[m] - gen_logp[m]).abs().max() > 0.1


# -------------------------------------------------------------------------------- 3. padding invariance


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_logprobs_values_and_scores_do_not_depend_on_padding(models, recorded, arch, request):
    """Each rollout row scored alone with no padding at all, versus inside a batch with 0, 1, 3, 7 more
    LEFT pads on every prompt and as many more RIGHT pads after every response (attention 0): actor and
    reference log-probs, critic values and reward scores agree to 1e-5. OPT would survive missing
    position ids (it derives them from the mask); GPT-2 would not."""
    maker, pad = (
        request.getfixturevalue({"opt": "stage", "gpt2": "gpt2_stage"}[arch]).maker,
        models.tok.pad_token_id,
    )
    rows = _rows(recorded.rollout)
    alone = []
    for p, r in rows:
        ids = torch.cat([p, r])[None]
        alone.append(maker.score(ids, torch.ones_like(ids), len(p)))
    for extra in (0, 1, 3, 7):
        seq, mask, prompt_len = _pack(rows, pad, extra_left=extra, extra_right=extra)
        if extra:
            assert (mask[:, 0] == 0).all() and (mask[:, -1] == 0).all()
        batched = maker.score(seq, mask, prompt_len)
        for i, (_, r) in enumerate(rows):
            n = len(r)
            for key in ("logprobs", "ref_logprobs", "values"):
                torch.testing.assert_close(
                    batched[key][i, :n], alone[i][key][0], atol=TOL, rtol=0, msg=f"{key}, {extra} pads"
                )
            torch.testing.assert_close(batched["scores"][i], alone[i]["scores"][0], atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------ 4. dropout


def test_tiny_config_ships_dropout_so_the_dropout_test_means_something(tiny_dir, models):
    assert AutoConfig.from_pretrained(tiny_dir).dropout == pytest.approx(0.1)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).train()
    ids = models.batches[0]["input_ids"]
    mask = models.batches[0]["attention_mask"]
    with torch.no_grad():
        a, b = (model(input_ids=ids, attention_mask=mask).logits for _ in range(2))
    assert not torch.equal(a, b)


def test_dropout_is_off_in_all_four_engines(models):
    """Two forwards in train mode are bit-identical in actor, reference, critic and reward engines, even
    when the flags ask for dropout (disable_dropout is applied on top of any config value)."""
    e = _stage(models, "--actor_dropout", "0.1", "--critic_dropout", "0.1").engines
    batch = models.batches[0]
    prompts = [
        ids[keep.bool()] for ids, keep in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    seq, mask, _ = _pack([(p, p[-5:]) for p in prompts], models.tok.pad_token_id, extra_left=2)
    kw = {"input_ids": seq, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}
    with torch.no_grad():
        for name, engine in (("actor", e.actor), ("ref", e.ref)):
            engine.train()
            first, second = engine(**kw).logits, engine(**kw).logits
            assert torch.equal(first, second), f"{name}: train-mode forwards differ (dropout on)"
        for name, engine in (("critic", e.critic), ("reward", e.reward)):
            engine.train()
            first, second = engine(seq, mask).values, engine(seq, mask).values
            assert torch.equal(first, second), f"{name}: train-mode forwards differ (dropout on)"


# ------------------------------------------------------------------------------------ 5. EOS and masks


@pytest.mark.parametrize(
    ("tokens", "expected_mask", "expected_end"),
    [
        ([0, 5, 6, 7], [1, 0, 0, 0], True),  # EOS first
        ([5, 0, 6, 7], [1, 1, 0, 0], True),  # EOS in the middle
        ([5, 0, 0, 0], [1, 1, 0, 0], True),  # EOS again after the first: still masked
        ([5, 0, 1, 0], [1, 1, 0, 0], True),  # pad, then EOS again
        ([5, 6, 7, 0], [1, 1, 1, 1], True),  # EOS last
        ([5, 6, 7, 8], [1, 1, 1, 1], False),  # no EOS: everything valid
        ([1, 1, 1, 1], [1, 1, 1, 1], False),  # pad is not EOS
    ],
)
def test_response_mask_hand_cases(tokens, expected_mask, expected_end):
    eos = 0
    mask, ends = response_mask(torch.tensor([tokens]), eos)
    assert mask.tolist() == [expected_mask]
    assert ends.tolist() == [expected_end]


def test_response_mask_rows_are_independent():
    responses = torch.tensor([[0, 5, 6], [5, 6, 7], [5, 0, 0]])
    mask, ends = response_mask(responses, eos_id=0)
    assert mask.tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert ends.tolist() == [True, False, True]


def test_rollout_is_masked_after_eos_and_scored_at_the_eos(models, stage, recorded):
    """In a real rollout: tokens after the first EOS are pad with attention 0, the EOS itself is the last
    valid token, rows without EOS run to the length limit; the score equals a direct RewardModel forward
    (normalised) on the row with every pad removed."""
    r, tok = recorded.rollout, models.tok
    p = r.prompt_len
    rm = RewardModel.from_pretrained(models.rm_dir).eval()
    assert (rm.gain, rm.bias) == (RM_GAIN, RM_BIAS)
    assert torch.equal(r.attention_mask[:, p:], r.action_mask)
    for i, (prompt, response) in enumerate(_rows(r)):
        n = len(response)
        after = r.seq[i, p + n :]
        assert (after == tok.pad_token_id).all(), f"row {i}: tokens after the response are not pad"
        if r.ends_with_eos[i]:
            assert response[-1] == tok.eos_token_id and (response[:-1] != tok.eos_token_id).all()
        else:
            assert n == MAX_ANSWER and (response != tok.eos_token_id).all()
        with torch.no_grad():
            ids = torch.cat([prompt, response])[None]
            direct = rm(ids, torch.ones_like(ids), normalize=True)
        torch.testing.assert_close(r.scores[i], direct.scores[0], atol=TOL, rtol=0)


def test_pad_differs_from_eos_and_the_eos_fraction_is_reported(models, stage, recorded):
    from step3_rlhf.report import rollout_stats

    tok = models.tok
    assert tok.pad_token_id != tok.eos_token_id
    for model in (stage.engines.actor.module, stage.engines.ref.module):
        for cfg in (model.config, model.generation_config):
            assert (cfg.pad_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    r = recorded.rollout
    stats = rollout_stats(r)
    assert stats["eos_fraction"] == pytest.approx(r.ends_with_eos.float().mean().item())
    assert stats["response_length"] == pytest.approx(r.action_mask.sum(1).float().mean().item())


# ------------------------------------------------------------------------------------ 6. reward identity


def test_rewards_sum_to_clipped_score_minus_kl_and_missing_eos_is_penalised(trained):
    """After an update (so KL != 0): per row, sum_t r_t = clip(score) - beta * sum_t kl_t; the score sits
    at the last valid token; other tokens get -beta * (logp - ref_logp) (higher logp, lower reward);
    rows without EOS got --missing_eos_penalty as their score, the others the reward engine's score."""
    r, e, a = trained.after, trained.stage.engines, trained.stage.args
    beta = trained.stage.maker.kl_ctl.value
    mask = r.action_mask.bool()
    assert beta == a.init_kl_coef == 0.1
    assert (r.kl[mask] != 0).any(), "the updated actor should differ from the reference"
    ends = r.ends_with_eos
    assert ends.any() and not ends.all(), f"need rows with and without EOS, got {ends.tolist()}"

    with torch.no_grad():
        rm_scores = e.reward(r.seq, r.attention_mask, normalize=True).scores
    torch.testing.assert_close(r.scores, torch.where(ends, rm_scores, torch.full_like(rm_scores, PENALTY)))
    clipped = r.scores.clamp(-CLIP, CLIP)
    assert (clipped != r.scores).any(), "no score was clipped: pick a smaller CLIP"

    torch.testing.assert_close(r.kl[mask], (r.logprobs - r.ref_logprobs)[mask])  # k1, sign logp - ref
    sums = masked_sum(r.rewards, r.action_mask, dim=1)
    expected = clipped - beta * masked_sum(r.kl, r.action_mask, dim=1)
    torch.testing.assert_close(sums, expected, atol=TOL, rtol=0)
    last = r.action_mask.sum(1) - 1
    for i in range(len(r)):
        n = int(last[i])
        kl_part = -beta * (r.logprobs[i, :n] - r.ref_logprobs[i, :n])
        torch.testing.assert_close(r.rewards[i, :n], kl_part, atol=1e-6, rtol=0)
        torch.testing.assert_close(r.rewards[i, n], clipped[i] - beta * r.kl[i, n], atol=1e-6, rtol=0)
        assert (r.rewards[i, n + 1 :] == 0).all()


# ------------------------------------------------------------------------------------------- 7. GAE


def test_returns_are_advantages_before_whitening_plus_values(recorded):
    r = recorded.rollout
    mask = r.action_mask.bool()
    raw = recorded.whiten_input
    assert raw.shape == r.advantages.shape == (ROLLOUT, r.action_mask.shape[1])
    torch.testing.assert_close(r.returns[mask], (raw + r.values)[mask], atol=1e-6, rtol=0)
    assert (r.returns[~mask] == 0).all() and (r.advantages[~mask] == 0).all()
    # Returns must not be the whitened advantages plus values.
    assert not torch.allclose(r.returns[mask], (r.advantages + r.values)[mask], atol=1e-3)


def test_advantages_are_whitened_once_over_the_whole_rollout(recorded):
    """Masked mean 0 and population variance 1 over all tokens of the rollout, and one affine map from the
    raw advantages (returns - values) for all rows: per-generation-batch whitening would give one map per
    batch."""
    r = recorded.rollout
    m = r.action_mask.bool()
    assert abs(masked_mean(r.advantages, r.action_mask).item()) < 1e-5
    assert masked_var(r.advantages, r.action_mask).item() == pytest.approx(1.0, abs=1e-4)
    raw, white = (r.returns - r.values)[m].double(), r.advantages[m].double()
    design = torch.stack([raw, torch.ones_like(raw)], dim=1)
    coef = torch.linalg.lstsq(design, white[:, None]).solution.squeeze(1)
    assert coef[0] > 0
    torch.testing.assert_close(design @ coef, white, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- 8. minibatch bookkeeping


def test_minibatch_schedule_uses_each_sample_once_per_epoch():
    n, minibatch, micro, epochs = 12, 4, 2, 3
    plan = minibatch_schedule(n, minibatch, micro, epochs, torch.Generator().manual_seed(0))
    assert len(plan) == epochs * n // minibatch
    per_epoch = n // minibatch
    orders = []
    for epoch in range(epochs):
        chunk = plan[epoch * per_epoch : (epoch + 1) * per_epoch]
        assert all(len(mb) == minibatch // micro and all(len(x) == micro for x in mb) for mb in chunk)
        order = torch.cat([x for mb in chunk for x in mb])
        assert sorted(order.tolist()) == list(range(n))
        orders.append(order.tolist())
    assert len({tuple(o) for o in orders}) > 1, "every epoch should draw a fresh permutation"
    again = minibatch_schedule(n, minibatch, micro, epochs, torch.Generator().manual_seed(0))
    assert [[x.tolist() for x in mb] for mb in again] == [[x.tolist() for x in mb] for mb in plan]


@pytest.mark.parametrize(("n", "minibatch", "micro"), [(10, 4, 2), (8, 4, 3), (8, 6, 2)])
def test_minibatch_schedule_rejects_sizes_that_do_not_divide(n, minibatch, micro):
    with pytest.raises(ValueError, match="must divide"):
        minibatch_schedule(n, minibatch, micro, 1, torch.Generator().manual_seed(0))


def test_train_takes_one_optimizer_step_per_minibatch(trained):
    """rollout 8, micro-batch 2, accumulation 2, 2 PPO epochs: 4 optimizer steps of 2 micro-batches each,
    in actor and critic alike."""
    assert trained.stats["optimizer_steps"] == OPTIMIZER_STEPS == 4
    micro_batches = PPO_EPOCHS * ROLLOUT // MICRO
    assert trained.steps == {"actor": (4, micro_batches), "critic": (4, micro_batches)}
    for key in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy"):
        assert key in trained.stats and torch.isfinite(torch.tensor(trained.stats[key])), key


# ---------------------------------------------------------------------------------- 9. concat_experience


def test_concat_experience_with_different_widths_keeps_every_row(models, stage, recorded):
    """Two parts with different prompt widths and response lengths: every row keeps its tokens and
    per-token values, and log-probs/values recomputed on the re-padded sequences equal the originals."""
    first = recorded.parts[0]
    short_args = copy.copy(stage.args)
    short_args.max_answer_seq_len = 5
    maker = ExperienceMaker(stage.engines, models.tok, short_args, stage.maker.kl_ctl, zero3_actor=False)
    batch = models.batches[1]
    ids = torch.cat([torch.full((GEN_BATCH, 3), models.tok.pad_token_id), batch["input_ids"]], dim=1)
    prompt_mask = torch.cat([torch.zeros(GEN_BATCH, 3, dtype=torch.long), batch["attention_mask"]], dim=1)
    torch.manual_seed(4)
    second = maker.make(ids, prompt_mask)
    assert first.prompt_len != second.prompt_len
    assert first.action_mask.shape[1] != second.action_mask.shape[1]

    cat = concat_experience([first, second], models.tok.pad_token_id)
    parts_rows = [(part, i) for part in (first, second) for i in range(len(part))]
    assert len(cat) == len(parts_rows)
    assert cat.prompt_len == max(first.prompt_len, second.prompt_len)
    assert cat.seq.shape[1] == cat.prompt_len + cat.action_mask.shape[1]
    torch.testing.assert_close(cat.attention_mask[:, cat.prompt_len :], cat.action_mask)
    for k, (part, i) in enumerate(parts_rows):
        keep_cat, keep_part = cat.attention_mask[k].bool(), part.attention_mask[i].bool()
        assert torch.equal(cat.seq[k][keep_cat], part.seq[i][keep_part])
        assert torch.equal(
            cat.seq[k][~keep_cat], torch.full_like(cat.seq[k][~keep_cat], models.tok.pad_token_id)
        )
        n = int(part.action_mask[i].sum())
        assert int(cat.action_mask[k].sum()) == n
        for f in ("logprobs", "ref_logprobs", "values", "kl"):
            assert torch.equal(getattr(cat, f)[k, :n], getattr(part, f)[i, :n]), f
        for f in ("scores", "ends_with_eos"):
            assert getattr(cat, f)[k] == getattr(part, f)[i], f

    again = stage.maker.score(cat.seq, cat.attention_mask, cat.prompt_len)
    m = cat.action_mask.bool()
    for key in ("logprobs", "ref_logprobs", "values"):
        torch.testing.assert_close(again[key][m], getattr(cat, key)[m], atol=TOL, rtol=0, msg=key)
    torch.testing.assert_close(again["scores"], cat.scores, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------- 10. a real update


def test_update_moves_actor_and_critic_but_not_the_frozen_models(trained):
    e = trained.stage.engines
    before = trained.params_before
    assert _params_changed(before["actor"], e.actor), "the actor did not change"
    assert _params_changed(before["critic"], e.critic), "the critic did not change"
    assert _params_changed(before["ref"], e.ref) == []
    assert _params_changed(before["reward"], e.reward) == []


def test_kl_to_the_reference_is_positive_after_an_update(trained):
    """Exact KL(pi || ref) of the tempered next-token distributions on the new rollout's valid positions."""
    r, e, t = trained.after, trained.stage.engines, trained.stage.args.temperature
    kw = {
        "input_ids": r.seq,
        "attention_mask": r.attention_mask,
        "position_ids": position_ids_from_mask(r.attention_mask),
    }
    with torch.no_grad():
        logp = torch.log_softmax(e.actor(**kw).logits[:, r.prompt_len - 1 : -1] / t, dim=-1)
        ref = torch.log_softmax(e.ref(**kw).logits[:, r.prompt_len - 1 : -1] / t, dim=-1)
    kl = (logp.exp() * (logp - ref)).sum(-1)
    assert masked_mean(kl, r.action_mask).item() > 1e-4
    assert (r.logprobs != r.ref_logprobs)[r.action_mask.bool()].all()


# ---------------------------------------------------------------------------------- 11. flag validation


def _parse(tmp_path, *extra: str) -> argparse.Namespace:
    return parse_args(
        ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--output_dir", str(tmp_path)]
        + list(extra)
    )


def test_rollout_must_be_a_multiple_of_the_minibatch(tmp_path):
    with pytest.raises(SystemExit) as info:
        _parse(
            tmp_path,
            *("--per_device_generation_batch_size", "4", "--generation_batches", "3"),
            *("--per_device_training_batch_size", "4", "--gradient_accumulation_steps", "2"),
        )
    message = str(info.value)
    for flag in (
        "--per_device_generation_batch_size",
        "--generation_batches",
        "--per_device_training_batch_size",
        "--gradient_accumulation_steps",
    ):
        assert flag in message
    assert "12" in message and "8" in message
    args = _parse(
        tmp_path,
        *("--per_device_generation_batch_size", "4", "--generation_batches", "4"),
        *("--per_device_training_batch_size", "4", "--gradient_accumulation_steps", "2"),
    )
    assert args.per_device_generation_batch_size * args.generation_batches == 16


@pytest.mark.parametrize("temperature", ["0", "-0.5"])
def test_temperature_must_be_positive(tmp_path, temperature):
    with pytest.raises(SystemExit, match="--temperature"):
        _parse(tmp_path, "--temperature", temperature)


def test_deepspeed_chat_step3_flags_are_accepted_or_refused_clearly(tmp_path):
    from step3_rlhf.args import parse_args

    base = [
        "--actor_model_name_or_path",
        "a",
        "--critic_model_name_or_path",
        "c",
        "--output_dir",
        str(tmp_path),
    ]
    args = parse_args([*base, "--num_padding_at_beginning", "1", "--disable_actor_dropout"])
    assert args.actor_dropout == 0.0 and args.critic_dropout == 0.0
    for flag in ("--align_overflow", "--enable_mixed_precision_lora"):
        with pytest.raises(SystemExit, match="not implemented"):
            parse_args([*base, flag])


# ------------------------------------------------------------------ 10. critic-free estimators, reward functions


@pytest.fixture(scope="module")
def grouped(models) -> tuple[Stage, Rollout]:
    """GRPO with 2 answers per prompt, KL as a loss term: engines without a critic, and one rollout of two
    generation batches of GEN_BATCH / 2 prompts each (so as many answers as PPO's rollout)."""
    st = _stage(
        models,
        *("--advantage_estimator", "grpo", "--num_samples_per_prompt", "2", "--kl_in_loss"),
        *("--per_device_generation_batch_size", str(GEN_BATCH // 2)),
    )
    half = [{k: v[: GEN_BATCH // 2] for k, v in b.items()} for b in models.batches[:GEN_BATCHES]]
    torch.manual_seed(3)
    return st, st.maker.make_rollout(half)


def test_critic_free_engines_have_no_critic(grouped, stage):
    st, _ = grouped
    assert st.engines.critic is None and stage.engines.critic is not None
    assert st.engines.reward is not None  # --critic_model_name_or_path serves as the reward model
    assert st.args.loss_agg == "seq_mean_token_mean" and st.args.whiten_advantages is False


def test_group_answers_share_their_prompt_and_get_the_group_normalised_score(grouped, models):
    st, r = grouped
    assert len(r) == ROLLOUT
    prompt_len = r.prompt_len
    # prompt j of the rollout, unpadded: GEN_BATCH / 2 from each of the two generation batches
    prompts = [
        ids[mask.bool()] for b in models.batches[:GEN_BATCHES]
        for ids, mask in zip(b["input_ids"][: GEN_BATCH // 2], b["attention_mask"][: GEN_BATCH // 2], strict=True)
    ]  # fmt: skip
    # rows 2j and 2j + 1 hold prompt j (left padding may differ between the two batches' widths)
    for i in range(ROLLOUT):
        ids = r.seq[i, :prompt_len][r.attention_mask[i, :prompt_len].bool()]
        assert torch.equal(ids, prompts[i // 2]), i
    assert not torch.equal(r.seq[0], r.seq[1]), "two samples of one prompt should differ"
    # the actor is the reference before any update and the KL is not in the reward: every valid token of
    # answer i gets (s_i - mean of its group) / (std + eps), and there are no values
    adv = rl_math.grpo_scores(r.scores, 2, st.args.group_std_eps)
    mask = r.action_mask.bool()
    torch.testing.assert_close(r.advantages, torch.where(mask, adv[:, None], 0.0), atol=1e-6, rtol=0)
    assert (r.values == 0).all()


def test_critic_free_update_moves_the_actor_and_adds_the_kl_loss(grouped):
    st, r = grouped
    before = {k: v.detach().clone() for k, v in st.engines.actor.module.named_parameters()}
    stats = PPOTrainer(st.engines, st.args, None, zero3_actor=False).train(r)
    assert "value_loss" not in stats and "value_clipfrac" not in stats
    # the KL loss term is 0 on the first micro-batch (actor = reference) and positive once the actor moved
    assert 0 < stats["kl_loss"] < 1
    assert _params_changed(before, st.engines.actor)


def test_reward_is_the_weighted_sum_of_reward_model_and_reward_function(stage, recorded, monkeypatch):
    """--reward_model_coef x the RM's normalised score + --reward_fn_coef x the function's score, the function
    seeing each answer decoded as the held-out gold sees it (no EOS, no special tokens)."""
    from common.evaluation.score_fn import ScoreFunction

    r = recorded.rollout
    seen = {}

    def answer_length(prompts, responses, finished):
        seen.update(prompts=prompts, responses=responses, finished=finished)
        return [float(len(x)) for x in responses]

    maker = stage.maker
    rm_only = maker.reward_scores(r.seq, r.attention_mask, r.prompt_len)
    monkeypatch.setattr(
        maker, "reward_fn", ScoreFunction("t:answer_length", answer_length, flag="--reward_fn")
    )
    args = copy.copy(maker.args)
    args.reward_model_coef, args.reward_fn_coef = 0.5, 2.0
    monkeypatch.setattr(maker, "args", args)
    total = maker.reward_scores(r.seq, r.attention_mask, r.prompt_len)
    lengths = torch.tensor([float(len(x)) for x in seen["responses"]])
    torch.testing.assert_close(total, 0.5 * rm_only + 2.0 * lengths)
    assert seen["finished"] == r.ends_with_eos.tolist()
    i = int(r.ends_with_eos.float().argmax())  # an answer that ended with EOS: its text has no EOS token
    answer = r.seq[i, r.prompt_len :][r.action_mask[i].bool()][:-1]
    assert seen["responses"][i] == models_decode(stage, answer)
    assert seen["prompts"][i] == models_decode(stage, r.seq[i, : r.prompt_len])


def models_decode(st: Stage, ids: torch.Tensor) -> str:
    return st.maker.tokenizer.decode(ids, skip_special_tokens=True)


def _raises_on_third(prompts, responses, finished):
    if len(responses) > 2:
        raise ZeroDivisionError("boom")
    return [0.0] * len(responses)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (_raises_on_third, r"--reward_fn t:f raised ZeroDivisionError: boom on 8 answers"),
        (
            lambda p, r, f: [1.0] * (len(r) - 1),
            r"--reward_fn t:f returned 7 scores for 8 rank 0's rollout answers",
        ),
        (
            lambda p, r, f: [0.0, float("inf")] + [0.0] * (len(r) - 2),
            r"--reward_fn t:f gave rank 0's rollout sample 1 the score inf; expected a finite number",
        ),
    ],
)
def test_a_failing_reward_function_stops_with_its_name_and_the_sample(
    stage, recorded, monkeypatch, fn, message
):
    from common.evaluation.score_fn import ScoreFunction

    r = recorded.rollout
    monkeypatch.setattr(stage.maker, "reward_fn", ScoreFunction("t:f", fn, flag="--reward_fn"))
    with pytest.raises(SystemExit, match=message):
        stage.maker.reward_scores(r.seq, r.attention_mask, r.prompt_len)


def test_a_reward_function_raising_on_one_sample_is_named(stage, recorded, monkeypatch):
    from common.evaluation.score_fn import ScoreFunction

    r = recorded.rollout
    texts = []
    for i in range(len(r)):  # each answer as the function sees it: without its EOS
        body = r.seq[i, r.prompt_len :][r.action_mask[i].bool()]
        texts.append(models_decode(stage, body[:-1] if r.ends_with_eos[i] else body))
    bad = texts[2]

    def picky(prompts, responses, finished):
        if bad in responses:
            raise ValueError("not this one")
        return [0.0] * len(responses)

    monkeypatch.setattr(stage.maker, "reward_fn", ScoreFunction("t:picky", picky, flag="--reward_fn"))
    first = texts.index(bad)  # the batch is retried one answer at a time: the first such answer is named
    with pytest.raises(
        SystemExit, match=rf"raised ValueError: not this one on rank 0's rollout sample {first} "
    ):
        stage.maker.reward_scores(r.seq, r.attention_mask, r.prompt_len)


def test_a_reward_function_gets_the_extra_columns_of_each_answers_prompt(grouped, models, monkeypatch):
    """The dataset's extra columns reach --reward_fn as keyword lists, repeated for each answer of a group
    (None where a row lacks a column)."""
    from common.evaluation.score_fn import ScoreFunction

    st, _ = grouped
    seen = {}

    def by_answer(prompts, responses, finished, **columns):
        seen.update(columns)
        return [float(v or 0) for v in columns["answer"]]

    monkeypatch.setattr(st.maker, "reward_fn", ScoreFunction("t:by_answer", by_answer, flag="--reward_fn"))
    args = copy.copy(st.args)
    args.reward_model_coef = 0.0  # the function alone
    monkeypatch.setattr(st.maker, "args", args)
    batch = {k: v[:2] for k, v in models.batches[0].items()}
    extra = [{"answer": 3, "unit": "kg"}, {"answer": 5}]
    r = st.maker.make(batch["input_ids"], batch["attention_mask"], extra)
    assert seen == {"answer": [3, 3, 5, 5], "unit": ["kg", "kg", None, None]}
    torch.testing.assert_close(r.scores, torch.tensor([3.0, 3.0, 5.0, 5.0]))


def test_a_reward_ensemble_scores_with_the_aggregate_of_its_members(models):
    """--reward_ensemble_models: the reward is ensemble_scores of the members' normalised scores (a second
    member with another head and normalisation), the critic still starts from the first, and the rollout's
    scores are the ensemble's."""
    torch.manual_seed(1)
    second = load_reward_model_for_training(str(models.actor_dir), models.tok)
    second.set_normalization(0.5, -0.2, "test fixture")
    second_dir = models.root / "rm_member_2"
    save_reward_model(second, second_dir, models.tok, 0)
    st = _stage(models, "--reward_ensemble_models", str(second_dir), "--reward_ensemble_aggregation", "min")
    ensemble = st.engines.reward
    assert len(ensemble.members) == 2 and ensemble.aggregation == "min"
    torch.manual_seed(0)
    r = st.maker.make_rollout(models.batches[:1])
    with torch.no_grad():
        each = torch.stack([m(r.seq, r.attention_mask, normalize=True).scores for m in ensemble.members])
    assert not torch.allclose(each[0], each[1]), "the two members should disagree"
    assert st.args.missing_eos_penalty is None  # so every row's score is the ensemble's
    torch.testing.assert_close(r.scores, each.min(0).values)
    from step3_rlhf.report import algorithm_settings

    assert algorithm_settings(st.args)["reward_ensemble"]["members"] == [str(models.rm_dir), str(second_dir)]


def test_a_reward_ensemble_needs_a_reward_model(models):
    argv = _argv(models.root, models.actor_dir, models.rm_dir, "--reward_ensemble_models", str(models.rm_dir))
    argv += ["--advantage_estimator", "grpo", "--num_samples_per_prompt", "2", "--reward_model_coef", "0",
             "--reward_fn", "common.evaluation.gold:synthetic_gold"]  # fmt: skip
    with pytest.raises(SystemExit, match="--reward_ensemble_models adds members to the reward model"):
        parse_args(argv)


# ------------------------------------------------------- 12. policy-loss variants: DAPO, GSPO, dual-clip


def test_variant_flags_reach_the_policy_loss_and_truncated_answers_leave_it(models, recorded, monkeypatch):
    """--clip_ratio_high, --dual_clip, --ratio_level and --mask_truncated_answers arrive in policy_loss: the
    clip bounds, the cap, the ratio level, and a mask without the answers that hit the limit without EOS."""
    st = _stage(
        models,
        *("--clip_ratio_high", "0.28", "--dual_clip", "3", "--ratio_level", "sequence"),
        "--mask_truncated_answers",
    )
    seen = []
    real = trainer_module.policy_loss

    def spy(logp, old_logp, advantages, mask, clip_eps, **options):
        seen.append({"mask": mask.clone(), "clip_eps": clip_eps, **options})
        return real(logp, old_logp, advantages, mask, clip_eps, **options)

    monkeypatch.setattr(trainer_module, "policy_loss", spy)
    r = recorded.rollout
    mb = r.select(torch.arange(len(r)))
    stats = PPOTrainer(st.engines, st.args, None, zero3_actor=False).actor_step(mb)
    (call,) = seen
    assert (call["clip_eps"], call["clip_eps_high"], call["dual_clip"]) == (0.2, 0.28, 3.0)
    assert call["ratio_level"] == "sequence"
    ends = mb.ends_with_eos
    assert call["mask"][~ends].sum() == 0 and torch.equal(call["mask"][ends], mb.action_mask[ends])
    assert "dual_clipfrac" in stats
    settings = report_module.algorithm_settings(st.args)
    assert settings["clip_ratio"] == [0.2, 0.28] and settings["dual_clip"] == 3.0
    assert settings["ratio_level"] == "sequence" and settings["mask_truncated_answers"] is True


def test_a_micro_batch_of_truncated_answers_trains_no_policy_term(models, recorded):
    st = _stage(models, "--mask_truncated_answers", "--entropy_coef", "0.01")
    r = recorded.rollout
    cut = torch.nonzero(~r.ends_with_eos).flatten()[:ACCUM]
    assert len(cut) == ACCUM, r.ends_with_eos
    before = {k: v.detach().clone() for k, v in st.engines.actor.module.named_parameters()}
    trainer = PPOTrainer(st.engines, st.args, None, zero3_actor=False)
    for i in cut:  # one micro-batch of one cut-off answer each, up to the accumulation boundary
        stats = trainer.actor_step(r.select(i[None]))
        assert stats["policy_loss"].item() == 0.0 and "clipfrac" not in stats
    assert _params_changed(before, st.engines.actor)  # the entropy term still trains


def test_overlong_penalty_is_added_to_each_score_by_answer_length(models, stage, monkeypatch):
    maker = stage.maker
    batch = models.batches[0]
    torch.manual_seed(5)
    plain = maker.make(batch["input_ids"], batch["attention_mask"])
    args = copy.copy(maker.args)
    args.overlong_buffer_len, args.overlong_penalty_factor = 8, 0.5
    monkeypatch.setattr(maker, "args", args)
    torch.manual_seed(5)
    shaped = maker.make(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(plain.seq, shaped.seq)
    lengths = plain.action_mask.sum(1).tolist()
    # MAX_ANSWER 16, buffer 8: free up to 8 tokens, then -0.5 / 8 per token up to -0.5 at 16
    expected = [-0.5 * min(max(n - 8, 0) / 8, 1.0) for n in lengths]
    assert any(e < 0 for e in expected) and any(e == 0 for e in expected), lengths
    torch.testing.assert_close(shaped.scores - plain.scores, torch.tensor(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--dual_clip", "1"), "--dual_clip must be > 1"),
        (("--clip_ratio_high", "0"), "--clip_ratio_high must be > 0"),
        (("--clip_ratio_low", "1.2"), "--clip_ratio_low must be < 1"),
        (("--overlong_buffer_len", "1000"), "--overlong_buffer_len must be in"),
        (("--overlong_penalty_factor", "-1"), "--overlong_penalty_factor must be >= 0"),
        (("--ratio_level", "answer"), "invalid choice"),
    ],
)
def test_bad_policy_loss_variant_settings_are_refused_at_parse_time(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        _parse(tmp_path, *flags)
    assert message in str(info.value) + capsys.readouterr().err


def test_clip_bounds_default_to_the_symmetric_cliprange(tmp_path):
    args = _parse(tmp_path, "--cliprange", "0.1")
    assert (args.clip_ratio_low, args.clip_ratio_high) == (0.1, 0.1)
    args = _parse(tmp_path, "--clip_ratio_low", "0.2", "--clip_ratio_high", "0.28")
    assert (args.clip_ratio_low, args.clip_ratio_high) == (0.2, 0.28)
