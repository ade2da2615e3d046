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

import time
from pathlib import Path

import torch

from common import dist
from common.evaluation.heldout import ANSWERS_FILE, format_eval, load_gold_reward, write_heldout_answers
from common.evaluation.metrics import AnswerEval, PolicyMetrics, write_metrics
from common.evaluation.score_fn import load_score_function
from common.files import final_outputs
from common.models.saving import save_hf_model, save_reward_model
from common.rl_math import kl_controller
from common.training.checkpoint import (
    BatchStream,
    append_train_log,
    data_position,
    restore_rng,
    resume_if_asked,
    save_checkpoint,
)
from common.training.engines import peak_memory_mb, to_device
from common.training.monitor import Monitor, progress
from common.training.output_dir import claim_output_dir
from common.training.stage import start_stage
from common.validate import validate_ppo
from step3_rlhf.args import parse_args
from step3_rlhf.engines import build_engines
from step3_rlhf.experience import ExperienceMaker
from step3_rlhf.heldout import HELDOUT_CHARTS, evaluate
from step3_rlhf.plan import build_ppo_data, plan
from step3_rlhf.ppo_trainer import PPOTrainer
from step3_rlhf.report import algorithm_settings, describe_algorithm, print_answers, rollout_stats
from step3_rlhf.resume import (
    ema_writer,
    load_ema,
    ppo_extra_state,
    restore_ppo_extra_state,
    trained_engines,
)

METRICS_FILE = "ppo_metrics.json"  # written last: the stage finished

# What the prompt and PPO-ptx streams' positions depend on (with the data and the world size).
BATCH_FLAGS = (
    "seed",
    "per_device_generation_batch_size",
    "generation_batches",
    "per_device_training_batch_size",
)


def main(argv: list[str] | None = None) -> None:
    args, dev, tokenizer = start_stage("ppo", argv, parse_args, validate_ppo, "actor_model_name_or_path")
    gold = load_gold_reward(args.gold_reward, args.data_path)  # importable and callable, before any compute
    reward_fn = load_score_function(args.reward_fn, "--reward_fn")

    # data and schedule
    data = build_ppo_data(args, tokenizer)
    schedule = plan(args, data.prompts)

    # engines
    engines = build_engines(args, tokenizer, schedule.optimizer_steps, schedule.optimizer_steps)
    kl_ctl = kl_controller(args.adaptive_kl, args.init_kl_coef, args.kl_target, args.kl_horizon)
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

    def evaluate_heldout(step: int, tag: str) -> tuple[dict[str, float], list]:
        result, answers = evaluate(maker, data.heldout, dev, args.seed, gold)
        dist.print_rank0(f"[ppo] held-out {tag}: {format_eval(result)}")
        monitor.log({f"eval/{k}": v for k, v in result.items()}, step)
        return result, answers

    # resume, or start by evaluating the stage-1 policy
    claim_output_dir(args.output_dir, "ppo", args)
    position = data_position(args, BATCH_FLAGS, **data.streams)
    state, resumed_from = resume_if_asked(args, trained_engines(engines), "ppo", position)
    batches = BatchStream(data.prompts, state.step * args.generation_batches, epochs=args.num_train_epochs)
    if data.ptx is not None:
        trainer.ptx_batches = BatchStream(data.ptx, state.extra.get("ptx_batches", 0))
    if resumed_from is None:
        torch.manual_seed(
            args.seed + dist.get_rank()
        )  # sampling differs across ranks (docs/ppo-fidelity.md 21)
        dist.print_rank0(f"[ppo] gold reward of held-out answers: {gold.name if gold else 'none'}")
        before, before_answers = evaluate_heldout(0, "before PPO (stage-1 policy)")
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

    # PPO: rollout -> statistics -> update -> KL controller -> log, evaluate, checkpoint
    step = state.step
    bar = progress(range(state.step, schedule.iterations), total=schedule.iterations - state.step, desc="ppo")
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
        kl_ctl.update(stats["kl"], schedule.rollout_size * dist.get_world_size())
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
            f"[ppo] step {step}/{schedule.iterations} score {stats['score_mean']:+.3f} kl {stats['kl']:.3f} "
            f"len {stats['response_length']:.1f} eos {stats['eos_fraction']:.2f} "
            f"pg {losses['policy_loss']:+.4f} vf {losses['value_loss']:.4f}"
        )
        if args.print_answers and step % args.print_answers_interval == 0:
            print_answers(tokenizer, rollout, step)
        if schedule.eval_interval and step % schedule.eval_interval == 0 and step < schedule.iterations:
            result, _ = evaluate_heldout(step, f"at step {step}")
            evals.append({"step": step, **result})
        if args.save_interval and step % args.save_interval == 0:
            state.step, state.epoch, state.batches_in_epoch = step, batches.epoch, batches.in_epoch
            state.skipped_steps = sum(trainer.skipped.values())
            state.extra = ppo_extra_state(kl_ctl, trainer, run)
            save_checkpoint(
                args.output_dir, trained_engines(engines), state, args.save_total_limit,
                write_extra=ema_writer(engines.ema, zero3),
            )  # fmt: skip

    # evaluate the trained policy, save the models, the held-out answers and the metrics
    after, after_answers = evaluate_heldout(step, "after PPO")
    evals.append({"step": step, **after})
    dist.print_rank0(
        f"[ppo] score gain {after['score'] - before['score']:+.3f} at final KL {history[-1]['kl']:.3f}"
    )
    gold_known = gold is not None and "gold_mean" in before
    if gold_known:
        dist.print_rank0(f"[ppo] gold gain {after['gold_mean'] - before['gold_mean']:+.3f} ({gold.name})")
    out = Path(args.output_dir)
    with final_outputs(out, METRICS_FILE) as staged:
        save_hf_model(engines.actor, staged / "actor", tokenizer, args.actor_zero_stage)
        if engines.ema is not None:
            save_hf_model(engines.ema, staged / "actor_ema", tokenizer, 3 if zero3 else 0)
        if engines.critic is not None:
            save_reward_model(engines.critic, staged / "critic", tokenizer, args.critic_zero_stage)
        if dist.is_rank0() and run["before_answers"] is not None:
            write_heldout_answers(staged / ANSWERS_FILE, run["before_answers"], after_answers)
    if dist.is_rank0():
        metrics = PolicyMetrics(
            before=AnswerEval.from_dict(before),
            after=AnswerEval.from_dict(after),
            evals=[AnswerEval.from_dict(e) for e in evals],
            final_kl=history[-1]["kl"],
            gold_reward=gold.name if gold else None,
            score_gain=after["score"] - before["score"],
            gold_gain=after["gold_mean"] - before["gold_mean"] if gold_known else None,
            algorithm=algorithm_settings(args),
            history=history,
            extra={
                "eval_interval": schedule.eval_interval,
                "skipped_nonfinite_microbatches": trainer.skipped,
                "samples_generated": len(history) * schedule.rollout_size * dist.get_world_size(),
                "peak_memory_mb": peak_memory_mb(),  # rank 0's: accelerator on a GPU, RSS on CPU
            },
        )
        write_metrics(metrics, out / METRICS_FILE)
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
