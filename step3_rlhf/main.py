"""Stage 3: PPO with actor, reference, critic and reward models as DeepSpeed engines, or a critic-free
estimator (GRPO, Dr. GRPO, RLOO, REINFORCE++) on the same engines less the critic; the reward is a reward
model, a reward function (--reward_fn), or their weighted sum.

    deepspeed step3_rlhf/main.py --actor_model_name_or_path out/sft --critic_model_name_or_path out/rm ...
    deepspeed step3_rlhf/main.py --actor_model_name_or_path out/sft --reward_model_name_or_path out/rm \
        --advantage_estimator grpo --num_samples_per_prompt 4 --kl_in_loss ...

One iteration: take `--generation_batches` prompt batches, make experience (sample n answers per prompt,
score them, advantages of --advantage_estimator), run `--ppo_epochs` of minibatch updates on the actor (and
critic), update the KL controller, log. Held-out prompts are evaluated before training (the stage-1 policy), every --eval_interval
iterations and after, so the run reports how much PPO raised the reward model's score, at what KL, and what
the gold reward (where one is known, --gold_reward) and the reward-hacking measures say of it
(step3_rlhf/heldout.py; the answers themselves go to heldout_answers.jsonl). Saves actor, EMA actor and
critic.

With --save_interval N a resumable checkpoint is written every N iterations (step3_rlhf/resume.py says
what it holds); --resume continues from it, and the continued run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from common import dist
from common.args import data_config
from common.checkpoint import (
    BatchStream,
    append_train_log,
    check_output_dir,
    claim_output_dir,
    data_position,
    restore_rng,
    resume_if_asked,
    save_checkpoint,
)
from common.data import PromptCollator, build_stage_data, load_unsupervised
from common.errors import exit_cleanly_on_user_errors
from common.files import final_outputs, write_text_atomic
from common.heldout import ANSWERS_FILE, format_eval, load_gold_reward, write_heldout_answers
from common.model import load_tokenizer, save_hf_model
from common.monitor import Monitor, progress
from common.reward_model import save_reward_model
from common.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    get_advantage_estimator,
    masked_mean,
    masked_sum,
)
from common.score_fn import ScoreFunction, import_score_function
from common.training import device, eval_loader, peak_memory_mb, set_seed, to_device, train_loader
from common.validate import reward_model_path, validate_ppo
from step3_rlhf.args import parse_args
from step3_rlhf.engines import build_engines
from step3_rlhf.experience import ExperienceMaker, Rollout
from step3_rlhf.heldout import HELDOUT_CHARTS, evaluate
from step3_rlhf.ppo_trainer import PPOTrainer
from step3_rlhf.resume import (
    ema_writer,
    load_ema,
    ppo_extra_state,
    restore_ppo_extra_state,
    trained_engines,
)

METRICS_FILE = "ppo_metrics.json"  # written last: the stage finished


def rollout_stats(r: Rollout) -> dict[str, float]:
    """Per-iteration statistics over all ranks (means of per-rank means; every rank has equal B)."""
    mask = r.action_mask
    seq_kl = masked_sum(r.kl, mask, dim=1)
    local = {
        "score_mean": r.scores.mean(),
        "score_sq_mean": (r.scores**2).mean(),
        "total_reward": masked_sum(r.rewards, mask, dim=1).mean(),
        "kl": seq_kl.mean(),  # mean over sequences of the per-sequence KL sum
        "response_length": mask.sum(1).float().mean(),
        "eos_fraction": r.ends_with_eos.float().mean(),
        "value_mean": masked_mean(r.values, mask),
        "advantage_mean": masked_mean(r.advantages, mask),
    }
    keys = list(local)
    reduced = dist.all_reduce_mean(torch.stack([local[k].float() for k in keys]))
    stats = dict(zip(keys, reduced.tolist(), strict=True))
    stats["score_std"] = max(stats.pop("score_sq_mean") - stats["score_mean"] ** 2, 0.0) ** 0.5
    return stats


def algorithm_settings(args) -> dict[str, object]:
    """The settings that say which RL algorithm ran: estimator, group size, reward, KL placement, loss
    aggregation (recorded in ppo_metrics.json)."""
    settings = {
        "advantage_estimator": args.advantage_estimator,
        "num_samples_per_prompt": args.num_samples_per_prompt,
        "critic": get_advantage_estimator(args.advantage_estimator).needs_critic,
        "reward_model": (reward_model_path(args) or (None, None))[1],
        "reward_model_coef": args.reward_model_coef,
        "reward_fn": args.reward_fn,
        "reward_fn_coef": args.reward_fn_coef,
        "kl": f"loss ({args.kl_loss_estimator}, coef {args.kl_loss_coef})" if args.kl_in_loss else "reward",
        "loss_agg": args.loss_agg,
        "whiten_advantages": args.whiten_advantages,
    }
    if args.reward_ensemble_models:
        settings["reward_ensemble"] = {
            "members": [settings["reward_model"], *args.reward_ensemble_models],
            "aggregation": args.reward_ensemble_aggregation,
            "std_coef": args.reward_ensemble_std_coef,
        }
    return settings


def describe_algorithm(args) -> str:
    """One log line of `algorithm_settings`."""
    s = algorithm_settings(args)
    model = f"reward model {s['reward_model']}"
    if "reward_ensemble" in s:
        ens = s["reward_ensemble"]
        model = f"{ens['aggregation']} of a {len(ens['members'])}-member reward-model ensemble"
    reward = " + ".join(
        [f"{s['reward_model_coef']:g} x {model}"] * (s["reward_model"] is not None)
        + [f"{s['reward_fn_coef']:g} x {s['reward_fn']}"] * (s["reward_fn"] is not None)
    )
    return (
        f"estimator {s['advantage_estimator']} ({'with' if s['critic'] else 'no'} critic), "
        f"{s['num_samples_per_prompt']} samples per prompt, reward {reward}, KL in the {s['kl']}, "
        f"loss {s['loss_agg']}, whitened advantages {'yes' if s['whiten_advantages'] else 'no'}"
    )


def resolve_eval_interval(eval_interval: int | None, iterations: int) -> int:
    """--eval_interval, or by default iterations // 6 (at least 1): 5 or 6 evaluations during a run of 6 or
    more iterations, at the multiples of the interval before the last one (the final evaluation covers it)."""
    return max(iterations // 6, 1) if eval_interval is None else eval_interval


def print_answers(tokenizer, r: Rollout, step: int) -> None:
    if not dist.is_rank0():
        return
    prompt = tokenizer.decode(r.seq[0, : r.prompt_len], skip_special_tokens=True)
    answer = tokenizer.decode(r.seq[0, r.prompt_len :][r.action_mask[0].bool()], skip_special_tokens=False)
    print(f"--- step {step} | score {r.scores[0].item():+.3f}\n{prompt.strip()}\n>>> {answer}", flush=True)


# What the prompt and PPO-ptx streams' positions depend on (with the data and the world size).
BATCH_FLAGS = (
    "seed",
    "per_device_generation_batch_size",
    "generation_batches",
    "per_device_training_batch_size",
)


def main(argv: list[str] | None = None) -> None:
    exit_cleanly_on_user_errors()
    args = parse_args(argv)
    gold = load_gold_reward(args.gold_reward, args.data_path)  # importable and callable, before any compute
    reward_fn = None
    if args.reward_fn is not None:
        reward_fn = ScoreFunction(
            args.reward_fn, import_score_function(args.reward_fn, "--reward_fn"), flag="--reward_fn"
        )
    dist.init_distributed()
    check_output_dir(args.output_dir, "ppo", args)
    set_seed(args.seed)
    dev = device()

    # data
    validate_ppo(args)  # model paths and weights, one tokenizer for all models, lengths, LoRA names
    tokenizer = load_tokenizer(
        args.actor_model_name_or_path, args.trust_remote_code, args.apply_chat_template
    )
    data = build_stage_data(data_config(args), tokenizer, stage=3)
    collate = PromptCollator(tokenizer.pad_token_id)
    # A rollout has a fixed size: each epoch's last, short batch of prompts is left out (counted below).
    prompts = train_loader(
        data.train, collate, args.per_device_generation_batch_size, args.seed, drop_last=True
    )
    eval_set = (
        data.eval
        if not args.eval_num_prompts
        else Subset(data.eval, range(min(args.eval_num_prompts, len(data.eval))))
    )
    # Held-out prompts are answered once each, in batches of as many sequences as a training generation batch
    # holds: runs with equal samples per batch (16 prompts x 1, 4 x 4) sample their "before" answers alike.
    eval_dl = eval_loader(
        eval_set, collate, args.per_device_generation_batch_size * args.num_samples_per_prompt
    )
    ptx_loader = None
    if args.unsupervised_dataset_name:
        blocks = load_unsupervised(
            args.unsupervised_dataset_name,
            args.unsupervised_dataset_config_name,
            tokenizer,
            args.max_prompt_seq_len + args.max_answer_seq_len,
            cache_dir=args.data_output_path,
        )
        ptx_loader = train_loader(
            blocks, torch.utils.data.default_collate, args.per_device_training_batch_size, args.seed
        )

    # schedule
    iterations_per_epoch = len(prompts) // args.generation_batches
    iterations = iterations_per_epoch * args.num_train_epochs
    if args.enable_test_mode:
        iterations = min(iterations, args.test_stop_step)
    if iterations < 1:
        raise SystemExit(
            f"{len(prompts.sampler)} training prompts per rank make {len(prompts)} full generation batches "
            f"(--per_device_generation_batch_size {args.per_device_generation_batch_size}), fewer than "
            f"--generation_batches {args.generation_batches}: lower them or add prompts"
        )
    unused = len(prompts.sampler) - iterations_per_epoch * args.generation_batches * prompts.batch_size
    if unused:
        dist.print_rank0(
            f"[ppo] {len(prompts.sampler)} prompts per rank and epoch: {iterations_per_epoch} iterations of "
            f"{args.generation_batches} x {prompts.batch_size}; the {unused} left over are not used that "
            "epoch (a different draw each epoch)"
        )
    eval_interval = resolve_eval_interval(args.eval_interval, iterations)
    rollout_size = (
        args.per_device_generation_batch_size * args.generation_batches * args.num_samples_per_prompt
    )
    minibatches = rollout_size // (args.per_device_training_batch_size * args.gradient_accumulation_steps)
    optimizer_steps = iterations * args.ppo_epochs * minibatches

    # engines
    engines = build_engines(args, tokenizer, optimizer_steps, optimizer_steps)
    kl_ctl = (
        AdaptiveKLController(args.init_kl_coef, args.kl_target, args.kl_horizon)
        if args.adaptive_kl
        else FixedKLController(args.init_kl_coef)
    )
    zero3 = args.actor_zero_stage == 3
    maker = ExperienceMaker(engines, tokenizer, args, kl_ctl, zero3_actor=zero3, reward_fn=reward_fn)
    dist.print_rank0(f"[ppo] {describe_algorithm(args)}")
    trainer = PPOTrainer(engines, args, None, zero3_actor=zero3)
    monitor = Monitor(
        args.enable_tensorboard, args.tensorboard_path or f"{args.output_dir}/tensorboard", "ppo"
    )

    monitor.charts(
        "held-out", HELDOUT_CHARTS if gold is not None else {"measures": HELDOUT_CHARTS["measures"]}
    )

    # resume, or start: positions of the prompt and PPO-ptx streams, then the RNG
    claim_output_dir(args.output_dir, "ppo", args)
    streams = {"prompt": (len(data.train), data.train_sha256)}
    if ptx_loader is not None:
        streams["ptx"] = (len(ptx_loader.dataset), "")  # its blocks are cached by content: rows say enough
    position = data_position(args, BATCH_FLAGS, **streams)
    state, resumed_from = resume_if_asked(args, trained_engines(engines), "ppo", position)
    batches = BatchStream(prompts, state.step * args.generation_batches, epochs=args.num_train_epochs)
    if ptx_loader is not None:
        trainer.ptx_batches = BatchStream(ptx_loader, state.extra.get("ptx_batches", 0))
    if resumed_from is None:
        # Sampling differs across ranks (docs/ppo-fidelity.md item 21).
        torch.manual_seed(args.seed + dist.get_rank())
        dist.print_rank0(f"[ppo] gold reward of held-out answers: {gold.name if gold else 'none'}")
        before, before_answers = evaluate(maker, eval_dl, dev, args.seed, gold)
        dist.print_rank0(f"[ppo] held-out before PPO (stage-1 policy): {format_eval(before)}")
        monitor.log({f"eval/{k}": v for k, v in before.items()}, 0)
        run = {
            "before": before,
            "before_answers": before_answers,
            "evals": [{"step": 0, **before}],
            "history": [],
        }
    else:
        run = restore_ppo_extra_state(state.extra, kl_ctl, trainer)
        if engines.ema is not None:
            load_ema(engines.ema, resumed_from, zero3)
        restore_rng(resumed_from)
    before, evals, history = run["before"], run["evals"], run["history"]

    step = state.step
    bar = progress(range(state.step, iterations), total=iterations - state.step, desc="ppo")
    for step in (s + 1 for s in bar):
        group = [to_device(next(batches), dev) for _ in range(args.generation_batches)]
        maker.seconds.clear()
        start = time.perf_counter()
        rollout = maker.make_rollout(group)
        experience_seconds = time.perf_counter() - start
        stats = rollout_stats(rollout)
        kl_coef_used = kl_ctl.value
        start = time.perf_counter()
        train_stats = trainer.train(rollout, step)
        train_seconds = time.perf_counter() - start
        kl_ctl.update(stats["kl"], rollout_size * dist.get_world_size())
        tokens = rollout.attention_mask.sum().item() * dist.get_world_size()
        record = {
            **stats,
            **train_stats,
            "kl_coef": kl_coef_used,
            **{f"{phase}_seconds": secs for phase, secs in maker.seconds.items()},
            "experience_seconds": experience_seconds,
            "training_seconds": train_seconds,
            "tokens_per_s": tokens / (experience_seconds + train_seconds),
        }
        history.append({"step": step, **record})
        monitor.log(record, step)
        losses = {k: train_stats.get(k, float("nan")) for k in ("policy_loss", "value_loss")}
        append_train_log(
            args.output_dir, {"step": step, "score": stats["score_mean"], "kl": stats["kl"], **losses}
        )
        dist.print_rank0(
            f"[ppo] step {step}/{iterations} score {stats['score_mean']:+.3f} kl {stats['kl']:.3f} "
            f"len {stats['response_length']:.1f} eos {stats['eos_fraction']:.2f} "
            f"pg {losses['policy_loss']:+.4f} vf {losses['value_loss']:.4f}"
        )
        if args.print_answers and step % args.print_answers_interval == 0:
            print_answers(tokenizer, rollout, step)
        if eval_interval and step % eval_interval == 0 and step < iterations:
            result, _ = evaluate(maker, eval_dl, dev, args.seed, gold)
            evals.append({"step": step, **result})
            dist.print_rank0(f"[ppo] held-out at step {step}: {format_eval(result)}")
            monitor.log({f"eval/{k}": v for k, v in result.items()}, step)
        if args.save_interval and step % args.save_interval == 0:
            state.step, state.epoch, state.batches_in_epoch = step, batches.epoch, batches.in_epoch
            state.skipped_steps = sum(trainer.skipped.values())
            state.extra = ppo_extra_state(kl_ctl, trainer, run)
            save_checkpoint(
                args.output_dir, trained_engines(engines), state, args.save_total_limit,
                write_extra=ema_writer(engines.ema, zero3),
            )  # fmt: skip

    after, after_answers = evaluate(maker, eval_dl, dev, args.seed, gold)
    evals.append({"step": step, **after})
    monitor.log({f"eval/{k}": v for k, v in after.items()}, step)
    dist.print_rank0(f"[ppo] held-out after PPO: {format_eval(after)}")
    dist.print_rank0(
        f"[ppo] score gain {after['score'] - before['score']:+.3f} at final KL {history[-1]['kl']:.3f}"
    )
    gold_known = gold is not None and "gold_mean" in before  # absent in checkpoints written before 2026-12-02
    if gold_known:
        dist.print_rank0(f"[ppo] gold gain {after['gold_mean'] - before['gold_mean']:+.3f} ({gold.name})")

    out = Path(args.output_dir)
    with final_outputs(out, METRICS_FILE) as staged:
        save_hf_model(engines.actor, staged / "actor", tokenizer, args.actor_zero_stage)
        if engines.ema is not None:
            save_hf_model(engines.ema, staged / "actor_ema", tokenizer, 3 if zero3 else 0)
        if engines.critic is not None:
            save_reward_model(engines.critic, staged / "critic", tokenizer, args.critic_zero_stage)
        if dist.is_rank0() and "before_answers" in run:  # absent in checkpoints written before 2026-11-21
            write_heldout_answers(staged / ANSWERS_FILE, run["before_answers"], after_answers)
    if dist.is_rank0():
        metrics = {
            "before": before,
            "after": after,
            "score_gain": after["score"] - before["score"],
            "final_kl": history[-1]["kl"],
            "gold_reward": gold.name if gold else None,
            "algorithm": algorithm_settings(args),
            **({"gold_gain": after["gold_mean"] - before["gold_mean"]} if gold_known else {}),
            "eval_interval": eval_interval,
            "skipped_nonfinite_microbatches": trainer.skipped,
            "samples_generated": len(history) * rollout_size * dist.get_world_size(),
            "peak_memory_mb": peak_memory_mb(),  # rank 0's: accelerator on a GPU, RSS on CPU
            "evals": evals,
            "history": history,
        }
        write_text_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2))
    saved = [
        "actor",
        *(["critic"] if engines.critic is not None else []),
        *(["actor_ema"] if engines.ema else []),
    ]
    dist.print_rank0(f"[ppo] saved {', '.join(saved)} to {out}")
    monitor.close()
    dist.destroy()


if __name__ == "__main__":
    main()
