"""DPO: train the stage-1 policy directly on the preference pairs of stage 2, against a frozen reference, with
no reward model and no sampling during training (Rafailov et al. 2023). An alternative to stages 2 + 3.
--loss_type picks the loss: DPO (sigmoid), IPO, KTO (on labelled rows: a user's unpaired ones, and each pair
as a desirable and an undesirable row), or the reference-free ORPO and SimPO, which load no second model.

    deepspeed step2_dpo/main.py --model_name_or_path out/sft --data_path Dahoas/rm-static ...
    python step2_dpo/main.py --model_name_or_path out/sft --output_dir out/dpo   # one process

Reads top to bottom as the algorithm: parse flags, load the pairs (stage 2's data and split) and the held-out
prompts (stage 3's eval split), build the policy engine and the frozen reference (its own engine, or the
policy with its LoRA adapters disabled; none for ORPO and SimPO), evaluate, train on -log sigmoid(beta * h)
(or the loss of --loss_type, plus an optional SFT term: step2_dpo/pairs.py) evaluating every --eval_interval
steps, evaluate again, save a Hugging Face model like stage 1's, plus dpo_metrics.json and
heldout_answers.jsonl.

Each evaluation has two parts: the pair metrics of the peers on held-out pairs (loss, reward accuracy, chosen
and rejected implicit rewards (beta * log(pi / pi_ref); ORPO's and SimPO's beta * mean log pi), their margin,
the chosen and rejected log-probs; KTO's per row), and answers sampled to held-out prompts exactly as stage 3
samples them, with their KL to the reference (none without a reference), the gold's figures when a gold is
known, and the reward-hacking measures (common/evaluation/heldout.py).
Beside it: the flags (args.py), the pair math (pairs.py), the answer sampler (answers.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from common import dist
from common.args import data_config
from common.data import PairCollator, PromptCollator, UnpairedCollator, build_stage_data
from common.evaluation.heldout import (
    ANSWERS_FILE,
    evaluate_answers,
    format_eval,
    load_gold_reward,
    write_heldout_answers,
)
from common.evaluation.metrics import AnswerEval, PolicyMetrics, write_metrics
from common.files import final_outputs
from common.models.loading import disable_dropout, load_causal_lm
from common.models.saving import save_hf_model
from common.rl_math import PREFERENCE_METHODS
from common.training.checkpoint import data_position, resume_if_asked
from common.training.ds_config import eval_config, torch_dtype
from common.training.engines import (
    eval_loader,
    frozen_engine,
    stage_causal_lm,
    stage_ds_config,
    stage_engine,
    train_loader,
)
from common.training.monitor import Monitor
from common.training.output_dir import claim_output_dir
from common.training.stage import start_stage
from common.training.supervised import train_supervised
from common.validate import validate_dpo
from step2_dpo.answers import answer_sampler
from step2_dpo.args import parse_args
from step2_dpo.pairs import Reference, dpo_loss, evaluate_pairs, mean_stats

METRICS_FILE = "dpo_metrics.json"


def build_policy_and_reference(args, tokenizer, ds_config: dict, batches_per_epoch: int):
    """The policy engine (dropout off, LoRA if asked) and its frozen reference (None for a reference-free
    loss)."""
    model = stage_causal_lm(args, tokenizer, ds_config, dropout=0.0)
    disable_dropout(model)  # the policy's log-probs must equal the reference's before the first update
    policy = stage_engine(model, args, ds_config, batches_per_epoch)
    if not PREFERENCE_METHODS[args.loss_type].reference:
        return policy, None

    adapters_only = args.lora_dim > 0 and args.only_optimize_lora
    if adapters_only and args.reference_model_name_or_path in (None, args.model_name_or_path):
        return policy, Reference(adapter_policy=policy)
    stage = 3 if args.zero_stage == 3 else 0
    ref_cfg = eval_config(
        zero_stage=stage,
        micro_batch_size=args.per_device_train_batch_size,
        world_size=dist.get_world_size(),
        dtype=args.dtype,
    )
    ref_model = load_causal_lm(
        args.reference_model_name_or_path or args.model_name_or_path,
        tokenizer,
        dtype=torch_dtype(args.dtype),
        dropout=0.0,
        ds_config=ref_cfg,
        trust_remote_code=args.trust_remote_code,
        allow_pickle_weights=args.allow_pickle_weights,
    )
    disable_dropout(ref_model)
    ref = frozen_engine(ref_model, stage, False, args.per_device_train_batch_size, args.dtype)
    return policy, Reference(engine=ref)


# What the order of training rows depends on (with the data and the world size).
BATCH_FLAGS = ("seed", "per_device_train_batch_size", "gradient_accumulation_steps")


def main(argv: list[str] | None = None) -> None:
    args, dev, tokenizer = start_stage("dpo", argv, parse_args, validate_dpo)
    gold = load_gold_reward(args.gold_reward, args.data_path)  # importable and callable, before any compute
    unpaired = not PREFERENCE_METHODS[args.loss_type].paired  # KTO: labelled rows, each pair as two
    unit = "rows" if unpaired else "pairs"
    pairs = build_stage_data(data_config(args), tokenizer, stage=2, unpaired=unpaired)
    collate = (UnpairedCollator if unpaired else PairCollator)(tokenizer.pad_token_id)
    train_dl = train_loader(pairs.train, collate, args.per_device_train_batch_size, args.seed)
    eval_dl = eval_loader(pairs.eval, collate, args.per_device_eval_batch_size)
    prompts_dl = None
    if args.eval_num_prompts:
        prompts = build_stage_data(data_config(args), tokenizer, stage=3).eval
        prompts = Subset(prompts, range(min(args.eval_num_prompts, len(prompts))))
        prompts_dl = eval_loader(
            prompts, PromptCollator(tokenizer.pad_token_id), args.per_device_eval_batch_size
        )

    ds_config = stage_ds_config(args)
    policy, reference = build_policy_and_reference(args, tokenizer, ds_config, len(train_dl))
    sample = answer_sampler(policy, reference, tokenizer, args, zero3=args.zero_stage == 3)

    claim_output_dir(args.output_dir, "dpo", args)
    engines = {"model": policy}
    position = data_position(args, BATCH_FLAGS, train=(len(pairs.train), pairs.train_sha256))
    state, resumed_from = resume_if_asked(args, engines, "dpo", position)

    monitor = Monitor(
        args.enable_tensorboard, args.tensorboard_path or f"{args.output_dir}/tensorboard", "dpo"
    )
    curve: list[dict[str, Any]] = state.extra.setdefault("evals", [])

    def run_eval(max_batches: int, tag: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        step = policy.global_steps
        result: dict[str, Any] = {
            "step": step,
            **evaluate_pairs(policy, reference, eval_dl, dev, args, max_batches),
        }
        answers: list[dict[str, Any]] = []
        line = ""
        if prompts_dl is not None:
            answer_stats, answers = evaluate_answers(sample, prompts_dl, dev, args.seed, tokenizer, gold)
            result.update(answer_stats)
            line = f" | answers: {format_eval(answer_stats)}"
        curve.append(result)
        dist.print_rank0(
            f"[dpo] {tag} step {step}: accuracy {result['accuracy']:.3f} margin {result['margin']:+.3f} "
            f"chosen {result['chosen_reward']:+.3f} rejected {result['rejected_reward']:+.3f} "
            f"loss {result['loss']:.4f} over {result[unit]} {unit}{line}"
        )
        monitor.log({f"eval/{k}": v for k, v in result.items() if k != "step"}, step)
        return result, answers

    before_answers: list[dict[str, Any]] = state.extra.get("before_answers", [])
    if not curve:  # a resumed run has them from the checkpoint
        _, before_answers = run_eval(args.eval_iters, "eval (stage-1 policy)")
        state.extra["before_answers"] = before_answers

    def step(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        loss, stats = dpo_loss(policy, reference, batch, args)
        means = mean_stats(stats)
        return loss, {k: v for k, v in means.items() if k != "loss"}, stats["loss"].shape[0]

    train_supervised(
        policy,
        train_dl,
        args,
        state,
        resumed_from,
        engines,
        monitor,
        stage="dpo",
        unit=unit,
        step_fn=step,
        dev=dev,
        evaluate=lambda: run_eval(args.eval_iters, "eval"),
    )
    final, after_answers = run_eval(0, "final eval (whole eval set)")

    before = curve[0]
    metrics = PolicyMetrics(
        before=AnswerEval.from_dict(before),
        after=AnswerEval.from_dict(final),
        evals=[AnswerEval.from_dict(e) for e in curve],
        final_kl=final.get("kl"),
        gold_reward=gold.name if gold is not None else None,
        extra={
            "loss_type": args.loss_type,
            "beta": args.beta,
            **({"simpo_gamma": args.simpo_gamma} if args.loss_type == "simpo" else {}),
            **(
                {"desirable_weight": args.desirable_weight, "undesirable_weight": args.undesirable_weight}
                if args.loss_type == "kto"
                else {}
            ),
            "optimizer_steps": policy.global_steps,
            "skipped_nonfinite_steps": state.skipped_steps,
        },
    )
    with final_outputs(args.output_dir, METRICS_FILE) as staged:
        save_hf_model(policy, staged, tokenizer, args.zero_stage)
        if dist.is_rank0() and prompts_dl is not None:
            write_heldout_answers(staged / ANSWERS_FILE, before_answers, after_answers)
    if dist.is_rank0():
        write_metrics(metrics, Path(args.output_dir) / METRICS_FILE)
    if "gold_mean" in final:
        kl = f" at KL {final['kl']:.3f} per sequence" if "kl" in final else ""
        dist.print_rank0(f"[dpo] held-out gold {before['gold_mean']:+.3f} -> {final['gold_mean']:+.3f}{kl}")
    dist.print_rank0(
        f"[dpo] held-out {unit[:-1]} accuracy {before['accuracy']:.3f} -> {final['accuracy']:.3f}; saved to "
        f"{args.output_dir}"
    )
    monitor.close()
    dist.destroy()


if __name__ == "__main__":
    main()
