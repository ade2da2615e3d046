"""What a stage-3 checkpoint holds beyond `common.training.checkpoint`'s engines, RNG and counters.

    actor/, critic/        DeepSpeed checkpoints of the trained engines (weights, Adam, scheduler; no critic/
                           for the critic-free estimators)
    ema.safetensors        the EMA actor's full weights (written by rank 0, gathered under ZeRO-3)
    trainer_state.json     step = PPO iterations done; extra = the JSON state below

extra: the KL controller (its coefficient moves with --adaptive_kl), the minibatch-permutation generator of
the PPO trainer, PPO-ptx batches consumed, skipped micro-batches, and the metrics so far (held-out score
before PPO and its answers, eval curve, per-iteration history) so the final ppo_metrics.json and
heldout_answers.jsonl cover the whole run. The
prompt position needs no entry: iteration N has consumed N x --generation_batches prompt batches.
The reference and reward models are frozen and rebuilt from their paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import deepspeed
import torch
from safetensors.torch import load_file, save_file

from common import dist
from common.models.saving import gathered_state_dict
from step3_rlhf.engines import Engines
from step3_rlhf.ppo_trainer import PPOTrainer

EMA_FILE = "ema.safetensors"


def trained_engines(engines: Engines) -> dict[str, Any]:
    """The engines whose DeepSpeed checkpoints a stage-3 checkpoint holds (no critic for the critic-free
    estimators)."""
    return {"actor": engines.actor} | ({"critic": engines.critic} if engines.critic is not None else {})


# Version of the `extra` layout below. 1 (no "schema" key): metrics without "before_answers" (checkpoints
# written before the held-out answers were kept); 2: with them.
SCHEMA = 2


def ppo_extra_state(kl_ctl, trainer: PPOTrainer, metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-serialisable state of the KL controller, the trainer and the metrics so far."""
    return {
        "schema": SCHEMA,
        "kl_controller": kl_ctl.state_dict(),
        "minibatch_generator": trainer.generator.get_state().tolist(),
        "ptx_batches": trainer.ptx_batches.consumed if trainer.ptx_batches is not None else 0,
        "skipped": dict(trainer.skipped),
        "metrics": metrics,
    }


def restore_ppo_extra_state(extra: dict[str, Any], kl_ctl, trainer: PPOTrainer) -> dict[str, Any]:
    """Put the KL controller and trainer back where `ppo_extra_state` found them; return the metrics.
    (The PPO-ptx stream is positioned by its constructor: see main.)"""
    schema = extra.get("schema", 1)
    if schema > SCHEMA:
        raise SystemExit(
            f"this checkpoint's PPO state has layout {schema}; this version reads up to {SCHEMA}: resume it "
            "with the version that wrote it"
        )
    kl_ctl.load_state_dict(extra["kl_controller"])
    trainer.generator.set_state(torch.tensor(extra["minibatch_generator"], dtype=torch.uint8))
    trainer.skipped.update(extra["skipped"])
    metrics = extra["metrics"]
    if schema == 1:
        metrics.setdefault("before_answers", None)  # the final heldout_answers.jsonl is then not written
    return metrics


def ema_writer(ema: torch.nn.Module | None, zero3: bool):
    """A `write_extra` hook for save_checkpoint that stores the EMA actor's weights (None without EMA)."""
    if ema is None:
        return None

    def write(directory: Path) -> None:
        state = gathered_state_dict(ema.module, 3 if zero3 else 0)  # collective under ZeRO-3
        if state is not None:
            save_file({k: v.contiguous() for k, v in state.items()}, str(directory / EMA_FILE))

    return write


@torch.no_grad()
def load_ema(ema: torch.nn.Module, checkpoint: Path, zero3: bool) -> None:
    """Copy the EMA weights saved in `checkpoint` into the EMA engine (parameter by parameter under ZeRO-3)."""
    path = checkpoint / EMA_FILE
    if not path.is_file():
        raise SystemExit(
            f"--resume {checkpoint}: {EMA_FILE} missing (was the run saved without --enable_ema?)"
        )
    saved = load_file(str(path))
    params = dict(ema.module.named_parameters())
    missing = sorted(set(params) - set(saved))
    if missing:
        raise SystemExit(f"--resume {path}: no EMA weights for {missing[:3]}...")
    for name, q in params.items():
        with deepspeed.zero.GatheredParameters([q], modifier_rank=0, enabled=zero3):
            if not zero3 or dist.is_rank0():
                q.data.copy_(saved[name].to(q.dtype))
