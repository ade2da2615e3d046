"""The four (five with EMA) DeepSpeed engines of PPO.

- actor:     the policy being trained (stage-1 output), ZeRO `--actor_zero_stage`, optional LoRA,
             gradient checkpointing and hybrid engine for generation (a plain engine, with one warning,
             where DeepSpeed cannot build its inference kernels: on CPU, or for a model without a policy).
- reference: a frozen copy of the initial actor, inference config; `--offload_reference_model` keeps
             its weights in CPU memory (ZeRO-3 parameter offload).
- critic:    initialised from the reward model (docs/ppo-fidelity.md item 13) with its normalisation folded into the
             head, so values start in reward units; trainable, ZeRO `--critic_zero_stage`. Only built for an
             estimator that needs values (gae); the critic-free ones (grpo, rloo, ...) have none.
- reward:    the frozen reward model, returning normalised scores (stage-2 statistics); none when the reward
             is a `--reward_fn` alone (`--reward_model_coef 0`, or no reward-model path). With
             `--reward_ensemble_models`, a `RewardEnsemble` of it and those frozen models, scoring with
             `common.rl_math.ensemble_scores` of their normalised scores.
- ema:       optional exponential moving average of the actor (`--enable_ema`), saved beside it.

Dropout is off in all of them (item 12): `--actor_dropout` / `--critic_dropout` default to 0 here and
`disable_dropout` is applied on top, so no config value can switch it back on.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from torch import nn

from common import dist
from common.models.loading import disable_dropout, load_causal_lm
from common.models.reward_model import load_reward_model_for_training
from common.rl_math import ensemble_scores, get_advantage_estimator
from common.training.ds_config import eval_config, torch_dtype, train_config
from common.training.engines import (
    engine_from_flags,
    frozen_engine,
    lora_and_checkpointing_flags,
    with_lora_and_checkpointing,
)
from common.validate import reward_model_path


@dataclass
class Engines:
    actor: nn.Module
    ref: nn.Module
    critic: nn.Module | None  # None for the critic-free estimators
    reward: nn.Module | RewardEnsemble | None  # None when the reward is a reward function alone
    ema: nn.Module | None
    hybrid: bool  # whether the actor is a DeepSpeed hybrid engine


class RewardEnsemble:
    """Frozen reward engines called as one: `ensemble(seq, attention_mask, normalize=True).scores` (B,) is
    `ensemble_scores` of the members' normalised scores, `.member_scores` (k, B) what each member said."""

    def __init__(self, members: list[nn.Module], aggregation: str, std_coef: float):
        self.members, self.aggregation, self.std_coef = members, aggregation, std_coef

    def __call__(
        self, seq: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> SimpleNamespace:
        member_scores = torch.stack(
            [m(seq, attention_mask, normalize=normalize).scores.float() for m in self.members]
        )
        scores = ensemble_scores(member_scores, self.aggregation, self.std_coef)
        return SimpleNamespace(scores=scores, member_scores=member_scores)


def hybrid_engine_unavailable(model: nn.Module) -> str | None:
    """Why DeepSpeed's hybrid engine could not run `model` with its inference kernels here (None if it can).

    Asked before the actor engine is built: DeepSpeed raises from inside `initialize()` when the kernels of
    a model it has a policy for cannot be built (on CPU: "This op had not been implemented on CPU backend"),
    and which models it has a policy for changes with the transformers version."""
    from deepspeed.ops.op_builder import InferenceBuilder
    from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine

    probe = SimpleNamespace(module=model, new_inference_container=None)
    try:  # DeepSpeed's own policy lookup, run on our model without building an engine
        DeepSpeedHybridEngine.populate_all_inference_policies(probe)
        has_policy = bool(probe.inference_policies)
    except Exception:  # a DeepSpeed whose lookup differs: let the kernels decide
        has_policy = True
    if not has_policy:
        return f"DeepSpeed has no inference policy for {type(model).__name__}"
    try:
        InferenceBuilder().load(verbose=False)
    except Exception as e:  # noqa: BLE001 - any build/load failure means no kernels
        accelerator = deepspeed.get_accelerator().device_name()
        return f"DeepSpeed's inference kernels cannot be built on the {accelerator} accelerator ({e})"
    return None


def _hybrid_engine_config(args: argparse.Namespace, model: nn.Module) -> dict | None:
    """The hybrid-engine section of the actor's DeepSpeed config, or None: not asked for, or unavailable
    (then one warning says why, and the actor generates with the model's own generate())."""
    if not args.enable_hybrid_engine:
        return None
    if (reason := hybrid_engine_unavailable(model)) is not None:
        dist.print_rank0(
            f"[ppo] warning: --enable_hybrid_engine: {reason}; the actor is a plain DeepSpeed engine and "
            "generates with the model's own generate() (same samples, no inference kernels)"
        )
        return None
    return {
        "enabled": True,
        "max_out_tokens": args.max_prompt_seq_len + args.max_answer_seq_len,
        "inference_tp_size": args.inference_tp_size,
        "release_inference_cache": args.release_inference_cache,
        "pin_parameters": not args.unpin_actor_parameters,
        "tp_gather_partition_size": args.tp_gather_partition_size,
    }


def build_engines(args: argparse.Namespace, tokenizer, actor_steps: int, critic_steps: int) -> Engines:
    """Build every engine of stage 3 from the parsed flags. `*_steps` are optimizer steps (schedules)."""
    world = dist.get_world_size()
    dtype = torch_dtype(args.dtype)
    micro = args.per_device_training_batch_size
    gen_micro = args.per_device_generation_batch_size * args.num_samples_per_prompt

    # actor
    actor_cfg = train_config(
        zero_stage=args.actor_zero_stage,
        micro_batch_size=micro,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        world_size=world,
        dtype=args.dtype,
        offload=args.offload,
        gradient_clipping=args.gradient_clipping,
    )

    def new_actor_model(gradient_checkpointing: bool) -> nn.Module:
        model = load_causal_lm(
            args.actor_model_name_or_path,
            tokenizer,
            dtype=dtype,
            dropout=args.actor_dropout,
            ds_config=actor_cfg,
            trust_remote_code=args.trust_remote_code,
            allow_pickle_weights=args.allow_pickle_weights,
        )
        disable_dropout(model)
        flags = lora_and_checkpointing_flags(args, "actor_")
        return with_lora_and_checkpointing(
            model, **{**flags, "gradient_checkpointing": gradient_checkpointing}
        )

    actor_model = new_actor_model(args.actor_gradient_checkpointing)
    if (hybrid := _hybrid_engine_config(args, actor_model)) is not None:
        actor_cfg["hybrid_engine"] = hybrid
    actor = engine_from_flags(actor_model, args, actor_cfg, actor_steps, prefix="actor_")

    # reference: the initial actor, frozen
    ref_stage = 3 if args.actor_zero_stage == 3 else 0
    ref_cfg = eval_config(
        zero_stage=3 if args.offload_reference_model else ref_stage,
        micro_batch_size=gen_micro,
        world_size=world,
        dtype=args.dtype,
        offload=args.offload_reference_model,
    )
    ref_model = load_causal_lm(
        args.actor_model_name_or_path,
        tokenizer,
        dtype=dtype,
        dropout=0.0,
        ds_config=ref_cfg,
        trust_remote_code=args.trust_remote_code,
        allow_pickle_weights=args.allow_pickle_weights,
    )
    disable_dropout(ref_model)
    ref = frozen_engine(ref_model, ref_stage, args.offload_reference_model, gen_micro, args.dtype)

    # EMA of the actor: same construction (LoRA included) so parameter names match one to one.
    ema = None
    if args.enable_ema:
        ema = frozen_engine(new_actor_model(False), ref_stage, False, gen_micro, args.dtype)

    critic = None
    if get_advantage_estimator(args.advantage_estimator).needs_critic:
        critic = _build_critic(args, tokenizer, dtype, world, critic_steps)
    reward = None
    if (found := reward_model_path(args)) is not None:
        # ZeRO-3 partitions the reward model like the critic beside it, or like the actor when there is none.
        stage = args.critic_zero_stage if critic is not None else args.actor_zero_stage
        reward = _build_reward(args, tokenizer, found[1], dtype, world, stage)
        if args.reward_ensemble_models:
            members = [
                _build_reward(args, tokenizer, p, dtype, world, stage) for p in args.reward_ensemble_models
            ]
            reward = RewardEnsemble(
                [reward, *members], args.reward_ensemble_aggregation, args.reward_ensemble_std_coef
            )
    return Engines(actor=actor, ref=ref, critic=critic, reward=reward, ema=ema, hybrid=hybrid is not None)


def _build_critic(
    args: argparse.Namespace, tokenizer, dtype: torch.dtype, world: int, steps: int
) -> nn.Module:
    """The critic engine: the reward model of --critic_model_name_or_path, its normalisation folded into the
    head (values start in the units of the normalised rewards), trainable."""
    micro = args.per_device_training_batch_size
    critic_cfg = train_config(
        zero_stage=args.critic_zero_stage,
        micro_batch_size=micro,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        world_size=world,
        dtype=args.dtype,
        offload=args.offload,
        gradient_clipping=args.gradient_clipping,
    )
    critic_model = load_reward_model_for_training(
        args.critic_model_name_or_path,
        tokenizer,
        dtype=dtype,
        dropout=args.critic_dropout,
        ds_config=critic_cfg,
        allow_pickle_weights=args.allow_pickle_weights,
        require_saved_head=True,
    )
    critic_model.fold_normalization_into_head()  # values start in the units of the normalised rewards
    disable_dropout(critic_model)
    critic_model = with_lora_and_checkpointing(critic_model, **lora_and_checkpointing_flags(args, "critic_"))
    return engine_from_flags(critic_model, args, critic_cfg, steps, prefix="critic_")


def _build_reward(
    args: argparse.Namespace, tokenizer, reward_path: str, dtype: torch.dtype, world: int, zero_stage: int
) -> nn.Module:
    """The frozen reward model of `reward_path`, returning normalised scores; partitioned when zero_stage is 3."""
    gen_micro = args.per_device_generation_batch_size * args.num_samples_per_prompt
    reward_stage = 3 if zero_stage == 3 else 0
    reward_cfg = eval_config(
        zero_stage=3 if args.offload_reward_model else reward_stage,
        micro_batch_size=gen_micro,
        world_size=world,
        dtype=args.dtype,
        offload=args.offload_reward_model,
    )
    reward_model = load_reward_model_for_training(
        reward_path,
        tokenizer,
        dtype=dtype,
        dropout=0.0,
        ds_config=reward_cfg,
        allow_pickle_weights=args.allow_pickle_weights,
        require_saved_head=True,
    )
    disable_dropout(reward_model)
    reward = frozen_engine(reward_model, reward_stage, args.offload_reward_model, gen_micro, args.dtype)
    return reward


@torch.no_grad()
def ema_update(ema: nn.Module, actor: nn.Module, beta: float, zero3: bool) -> None:
    """ema <- beta * ema + (1 - beta) * actor, parameter by parameter (gathered under ZeRO-3)."""
    ema_params = dict(getattr(ema, "module", ema).named_parameters())
    for name, p in getattr(actor, "module", actor).named_parameters():
        q = ema_params[name]
        with deepspeed.zero.GatheredParameters([p, q], modifier_rank=0, enabled=zero3):
            if not zero3 or dist.is_rank0():
                q.data.copy_(torch.lerp(p.data.to(q.dtype), q.data, beta))


# --------------------------------------------------------------------------- ZeRO-3 actor for generation


def has_inference_kernels(engine: nn.Module) -> bool:
    """Whether `engine` is a hybrid engine that swapped in DeepSpeed's inference kernels (it then gathers
    its layers itself during generate); False for plain engines and for the fallback to generate()."""
    return len(getattr(engine, "_inference_containers", [])) > 0


def _partitioned(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The ZeRO-3 parameters whose full data is not on this rank now (persistent small ones are)."""
    return [p for p in params if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]


@contextmanager
def zero3_hooks_suspended(engine: nn.Module) -> Iterator[None]:
    """Take the ZeRO-3 fetch/release hooks out of every module of `engine` for the duration, and put them
    back where they were (same hook dicts, same order) afterwards.

    With the hooks in place each submodule's forward all-gathers its parameters and releases them after,
    so a module run N times (N decode steps) gathers N times, whatever was gathered outside."""
    optimizer = engine.optimizer  # the ZeRO-3 optimizer, or the bare offload object of a frozen engine
    offload = getattr(optimizer, "parameter_offload", optimizer)
    handles = [offload.fwd_pre_hook, *offload.forward_hooks, *offload.backward_hooks]
    hook_dicts = {id(d): d for h in handles if (d := h.hooks_dict_ref()) is not None}
    saved = [(d, dict(d)) for d in hook_dicts.values()]
    for h in handles:
        if (d := h.hooks_dict_ref()) is not None:
            d.pop(h.id, None)
    try:
        yield
    finally:
        for d, before in saved:
            added = {k: v for k, v in d.items() if k not in before}
            d.clear()
            d.update(before)
            d.update(added)


def gathered_copy_fits(engine: nn.Module, share: float = 0.5) -> bool:
    """Whether one full copy of the partitioned weights of ZeRO-3 `engine` takes at most `share` of the
    accelerator memory free on every rank (free on the device plus PyTorch's cached, unused blocks), leaving
    the rest to the KV cache and logits. The same answer on every rank (a MIN over ranks); True on CPU."""
    if not torch.cuda.is_available():
        return True
    need = sum(p.ds_numel * p.element_size() for p in _partitioned(engine.module.parameters()))
    free, _ = torch.cuda.mem_get_info()
    free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    fits = torch.tensor(float(need <= share * free), device="cuda")
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(fits, op=torch.distributed.ReduceOp.MIN)
    return bool(fits.item())


@contextmanager
def gathered_for_generation(engine: nn.Module, enabled: bool = True) -> Iterator[None]:
    """All parameters of a ZeRO-3 `engine` gathered once, and its hooks suspended, for the duration: the
    model then runs like an unpartitioned one (no per-module all-gathers, so ranks need not step in sync).
    Costs one full copy of the weights per rank while inside, as DeepSpeed's hybrid engine does; the
    partitions are restored (and the copy freed) on exit. No-op when not `enabled`."""
    if not enabled:
        yield
        return
    params = _partitioned(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params), zero3_hooks_suspended(engine):
        yield
