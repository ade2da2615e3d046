"""What a stage-3 checkpoint adds to the engines' own (step3_rlhf/resume.py), in one process: the EMA actor's
weights round-trip under ZeRO-3 (gathered to save, scattered to load) and without ZeRO, and the KL
controller and minibatch generator are put back exactly. The 2-rank SIGKILL run is in test_resume_runs."""

from __future__ import annotations

from types import SimpleNamespace

import deepspeed
import pytest
import torch

from common.models.loading import load_causal_lm, load_tokenizer
from common.models.saving import gathered_state_dict
from common.rl_math import AdaptiveKLController
from common.training.ds_config import eval_config
from step3_rlhf.resume import EMA_FILE, ema_writer, load_ema, ppo_extra_state, restore_ppo_extra_state
from tests.runs.test_generation_speed import rank0_of_1  # noqa: F401  (fixture: this process as rank 0 of 1)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_ema_weights_round_trip(rank0_of_1, tiny_dir, tmp_path, zero_stage):  # noqa: F811
    cfg = eval_config(zero_stage=zero_stage, micro_batch_size=2, world_size=1, dtype="fp32", offload=False)
    tok = load_tokenizer(str(tiny_dir))
    model = load_causal_lm(str(tiny_dir), tok, ds_config=cfg)
    ema, *_ = deepspeed.initialize(model=model, config=cfg)
    zero3 = zero_stage == 3
    saved = gathered_state_dict(ema.module, zero_stage)

    ema_writer(ema, zero3)(tmp_path)
    assert (tmp_path / EMA_FILE).is_file()
    for p in ema.module.parameters():  # training moves the EMA on after the checkpoint
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=zero3):
            p.data.add_(1.0)
    moved = gathered_state_dict(ema.module, zero_stage)
    assert not any(torch.equal(moved[k], saved[k]) for k, _ in ema.module.named_parameters())

    load_ema(ema, tmp_path, zero3)
    restored = gathered_state_dict(ema.module, zero_stage)
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[k], saved[k]) for k in saved)
    if zero3:  # still partitioned (above the persistence threshold): the load left no full copies behind
        assert all(
            p.numel() == 0 or p.ds_numel > p.numel() for p in ema.module.parameters() if p.ds_numel > 1e4
        )


def test_ema_writer_is_none_without_ema():
    assert ema_writer(None, zero3=False) is None


def test_load_ema_names_the_missing_file(tmp_path):
    with pytest.raises(SystemExit, match=f"{EMA_FILE} missing"):
        load_ema(torch.nn.Linear(1, 1), tmp_path, zero3=False)


def test_kl_controller_and_minibatch_generator_restored_exactly():
    def trainer() -> SimpleNamespace:
        return SimpleNamespace(
            generator=torch.Generator().manual_seed(5), ptx_batches=None, skipped={"actor": 0, "critic": 0}
        )

    kl, t = AdaptiveKLController(0.2, 6.0, 100.0), trainer()
    kl.update(12.0, 8)
    torch.randperm(10, generator=t.generator)  # one PPO epoch's permutation drawn
    t.skipped["critic"] = 2
    extra = ppo_extra_state(kl, t, {"history": [{"step": 1}]})
    expected_perm = torch.randperm(10, generator=t.generator)

    kl2, t2 = AdaptiveKLController(0.2, 6.0, 100.0), trainer()
    metrics = restore_ppo_extra_state(extra, kl2, t2)
    assert kl2.value == kl.value != 0.2
    assert torch.equal(torch.randperm(10, generator=t2.generator), expected_perm)
    assert t2.skipped == {"actor": 0, "critic": 2}
    assert metrics == {"history": [{"step": 1}]}
