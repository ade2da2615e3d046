"""Generation speed-ups change no sampled token: the ZeRO-3 actor gathered once per generate() call
(--gather_actor_for_generation; by default when the copy fits) against ZeRO-3's own path, which
all-gathers each submodule's parameters at every decode step. And bench/bench_ppo.py, which measures it, runs.

One process (rank 0 of 1), actor under ZeRO-3, fp32, the tiny default, plain and as a LoRA hybrid engine (on
CPU the hybrid engine has no kernels and falls back to the model's generate, which is what gets gathered);
engines are built once per variant and the flag is toggled between calls. The 2-rank ZeRO-3 PPO run of
tests/runs/test_step3_runs.py covers the gathered path with ranks that no longer step in sync.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import pytest
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

from common import dist
from common.models.loading import load_tokenizer
from common.models.reward_model import load_reward_model_for_training
from common.models.saving import save_reward_model
from common.rl_math import FixedKLController
from step3_rlhf import experience as experience_module
from step3_rlhf.args import parse_args
from step3_rlhf.engines import Engines, build_engines, gathered_for_generation
from step3_rlhf.experience import ExperienceMaker
from tests.launch import run_stage

pytestmark = pytest.mark.slow  # ZeRO-3 engines on two ranks

BATCH, PROMPT, ANSWER = 4, 24, 16


@dataclass
class Zero3:
    engines: Engines
    maker: ExperienceMaker
    prompts: torch.Tensor  # (BATCH, PROMPT), left-padded
    mask: torch.Tensor  # (BATCH, PROMPT)


VARIANTS = {
    "plain": [],
    "hybrid_lora": [
        "--enable_hybrid_engine",
        "--actor_lora_dim",
        "4",
        "--actor_lora_module_name",
        "self_attn.",
    ],
}


@pytest.fixture(scope="module")
def rank0_of_1() -> Iterator[None]:
    """This process as rank 0 of 1, then as it was: a process group this fixture started is destroyed, so a
    later module starts its own, and the environment is restored, so no launcher variables leak into later
    launches (as in test_step3_fidelity, which leaves its group up but takes its variables back)."""
    environ = dict(os.environ)
    started = not dist.is_initialized()
    if started:
        dist.init_distributed()
    else:  # an earlier module's group: DeepSpeed still wants the launcher variables
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    yield
    if started:
        deepspeed.comm.destroy_process_group()  # (DeepSpeed's: it also drops its cached groups)
    os.environ.clear()
    os.environ.update(environ)


@pytest.fixture(scope="module")
def rm_dir(rank0_of_1, tiny_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen_speed_rm")
    tok = load_tokenizer(str(tiny_dir))
    torch.manual_seed(0)
    save_reward_model(load_reward_model_for_training(str(tiny_dir), tok), root, tok, 0)
    return root


@pytest.fixture(scope="module", params=list(VARIANTS))
def zero3(request, rm_dir, tiny_dir, tmp_path_factory) -> Zero3:
    root = tmp_path_factory.mktemp("gen_speed")
    tok = load_tokenizer(str(tiny_dir))
    args = parse_args(
        [
            *("--actor_model_name_or_path", str(tiny_dir), "--critic_model_name_or_path", str(rm_dir)),
            *("--output_dir", str(root / "out"), "--actor_zero_stage", "3", "--dtype", "fp32"),
            *("--per_device_generation_batch_size", str(BATCH)),
            *("--per_device_training_batch_size", str(BATCH)),
            *("--max_prompt_seq_len", str(PROMPT), "--max_answer_seq_len", str(ANSWER)),
            *VARIANTS[request.param],
        ]
    )
    engines = build_engines(args, tok, 10, 10)
    maker = ExperienceMaker(engines, tok, args, FixedKLController(args.init_kl_coef), zero3_actor=True)
    low = max(tok.eos_token_id, tok.pad_token_id) + 1
    prompts = torch.randint(low, len(tok), (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts)
    mask[1, :5] = 0  # one left-padded prompt: generate must derive its positions from the mask
    prompts[1, :5] = tok.pad_token_id
    return Zero3(engines=engines, maker=maker, prompts=prompts, mask=mask)


def _rollout(z: Zero3, gather: bool, seed: int = 0):
    z.maker.args.gather_actor_for_generation = gather
    torch.manual_seed(seed)
    return z.maker.make_rollout([{"input_ids": z.prompts, "attention_mask": z.mask}])


def _hook_ids(module: torch.nn.Module) -> list[tuple[list[int], list[int]]]:
    return [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in module.modules()]


def test_gathered_generation_samples_the_same_rollout(zero3):
    """Same seed, gather on and off (twice each, interleaved): identical sequences, masks, and the
    log-probs / values of the scoring forwards that run after it (so the restored hooks work)."""
    zero3.maker.args.gather_actor_for_generation = None
    assert zero3.maker.gather_actor(), "by default a ZeRO-3 actor on CPU is gathered"
    runs = [_rollout(zero3, gather) for gather in (False, True, False, True)]
    for r in runs[1:]:
        for name in ("seq", "attention_mask", "action_mask", "logprobs", "ref_logprobs", "values", "scores"):
            assert torch.equal(getattr(r, name), getattr(runs[0], name)), name
    assert runs[0].action_mask.shape[1] == ANSWER


@pytest.mark.parametrize(
    "flag, fits, gathers",
    [(False, True, False), (True, False, True), (None, True, True), (None, False, False)],
    ids=["no-gather", "gather", "default-fits", "default-does-not-fit"],
)
def test_gather_runs_no_per_step_fetches_and_restores_partitions_and_hooks(zero3, flag, fits, gathers):
    """--[no-]gather_actor_for_generation, or by default whether the gathered copy fits in memory, decides.
    Under the gather the ZeRO-3 coordinator fetches nothing during generate (it fetches every submodule at
    every decode step without); afterwards exactly the parameters that were partitioned before are
    partitioned again, and every module has the same hooks in the same order."""
    actor = zero3.engines.actor
    coordinator = actor.optimizer.parameter_offload.get_param_coordinator()
    fetches = []
    real_fetch = coordinator.fetch_sub_module

    def counting_fetch(*args, **kwargs):
        fetches.append(1)
        return real_fetch(*args, **kwargs)

    def partitioned() -> list[bool]:
        return [p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in actor.module.parameters()]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(coordinator, "fetch_sub_module", counting_fetch)
        mp.setattr(experience_module, "gathered_copy_fits", lambda engine: fits)
        zero3.maker.args.gather_actor_for_generation = flag
        before, hooks = partitioned(), _hook_ids(actor.module)
        zero3.maker.sample(zero3.prompts, zero3.mask)
    assert _hook_ids(actor.module) == hooks
    if gathers:
        assert not fetches
        assert partitioned() == before and any(before)
    else:  # (ZeRO-3's own path may leave a few parameters gathered, e.g. LoRA ones)
        assert len(fetches) >= ANSWER  # at least one fetch per decode step


def test_gathered_for_generation_disabled_is_a_no_op(zero3):
    actor = zero3.engines.actor
    hooks = _hook_ids(actor.module)
    with gathered_for_generation(actor, enabled=False):
        assert _hook_ids(actor.module) == hooks
    with gathered_for_generation(actor):
        assert all(p.ds_status == ZeroParamStatus.AVAILABLE for p in actor.module.parameters())
        # Only the engine's own input/output hooks on the root module are left (they run at ZeRO-0 too).
        engine_hooks = ([actor.module_forward_pre_hook.id], [actor.module_forward_post_hook.id])
        assert _hook_ids(actor.module) == [engine_hooks] + [([], [])] * (len(hooks) - 1)
    assert _hook_ids(actor.module) == hooks


def test_bench_ppo_selects_comparisons():
    from bench.bench_ppo import COMPARISONS, parse

    assert parse([]).compare == []
    assert parse(["--compare"]).compare == list(COMPARISONS)
    a = parse(["--compare", "kv,gather", "--", "--dtype", "fp32"])
    assert a.compare == ["kv", "gather"] and a.step3_flags == ["--dtype", "fp32"]
    with pytest.raises(SystemExit):
        parse(["--compare", "kv,fast"])


def test_bench_ppo_runs_every_comparison(tmp_path):
    """bench/bench_ppo.py end to end at toy sizes with every comparison: one JSON line with each ratio."""
    results = tmp_path / "results.jsonl"
    run_stage(
        "bench/bench_ppo.py",
        [
            *("--model", "tiny", "--batch", "2", "--prompt_len", "8", "--answer_len", "4"),
            *("--iterations", "1", "--repeats", "1", "--compare"),
            *("--workdir", str(tmp_path / "models"), "--results", str(results)),
        ],
        num_procs=1,
    )
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["generation_s"] > 0 and row["peak_memory_mb"] > 0
    for ratio in (
        "generation_without_over_with_cache",
        "naive_over_batched_experience_forwards",
        "full_over_response_logits_forwards",
        "actor_zero3_over_zero2",
        "actor_zero3_per_step_over_gathered_generation_s",
        "actor_zero3_per_step_over_gathered_s_per_iteration",
    ):
        assert row[ratio] > 0, ratio
