"""Stage 2: train a reward model on preference pairs.

    deepspeed step2_reward/main.py --model_name_or_path facebook/opt-350m --data_path Dahoas/rm-static ...
    python step2_reward/main.py --model_name_or_path out/tiny --output_dir out/rm   # one process

Reads top to bottom as the algorithm: parse flags, load tokenizer and pairs, build the engine around a
RewardModel (trunk of any causal LM + scalar head N(0, 1/sqrt(d+1)), score at the last valid token),
evaluate, train with the pairwise loss -logsigmoid(r_chosen - r_rejected - margin) for the given epochs
(evaluating every --eval_interval steps), evaluate on the whole held-out set, fit the normalisation
(step2_reward/normalize.py), save one Hugging Face directory that `RewardModel.from_pretrained` loads,
plus rm_metrics.json (accuracy curve, final metrics, normalisation) and normalization_sample.jsonl.
Beside it: the flags (args.py), their checks against the models (validate.py), the loss, scores and
metrics of pairs (pairwise.py), the normalisation (normalize.py).

The OpenAI recipe (docs/ppo-fidelity.md item 10) is one epoch with the learning rate annealed to 0: the
defaults (1 epoch, cosine schedule over the run) do exactly that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common import dist
from common.args import data_config
from common.data import PairCollator, build_stage_data
from common.evaluation.metrics import PairEval, RewardModelMetrics, write_metrics
from common.files import final_outputs
from common.models.reward_model import load_reward_model_for_training
from common.models.saving import save_reward_model
from common.training.checkpoint import data_position, resume_if_asked
from common.training.ds_config import torch_dtype
from common.training.engines import (
    eval_loader,
    lora_and_checkpointing_flags,
    stage_ds_config,
    stage_engine,
    to_device,
    train_loader,
    with_lora_and_checkpointing,
)
from common.training.monitor import Monitor
from common.training.output_dir import claim_output_dir
from common.training.stage import start_stage
from common.training.supervised import train_supervised
from step2_reward.args import parse_args
from step2_reward.normalize import normalize_reward_model, write_sample
from step2_reward.pairwise import evaluate, forward_pairs, log_eval, pairwise_loss, saved_scores_max_diff
from step2_reward.validate import validate_reward

METRICS_FILE = "rm_metrics.json"


# What the order of training rows depends on (with the data and the world size).
BATCH_FLAGS = ("seed", "per_device_train_batch_size", "gradient_accumulation_steps")


def main(argv: list[str] | None = None) -> None:
    args, dev, tokenizer = start_stage("reward", argv, parse_args, validate_reward)
    data = build_stage_data(data_config(args), tokenizer, stage=2)
    collate = PairCollator(tokenizer.pad_token_id)
    train_dl = train_loader(data.train, collate, args.per_device_train_batch_size, args.seed)
    eval_dl = eval_loader(data.eval, collate, args.per_device_eval_batch_size)

    ds_config = stage_ds_config(args)
    model = load_reward_model_for_training(
        args.model_name_or_path,
        tokenizer,
        dtype=torch_dtype(args.dtype),
        dropout=args.dropout,
        ds_config=ds_config,
        allow_pickle_weights=args.allow_pickle_weights,
    )
    model = with_lora_and_checkpointing(model, **lora_and_checkpointing_flags(args))
    engine = stage_engine(model, args, ds_config, len(train_dl))

    claim_output_dir(args.output_dir, "reward", args)
    engines = {"model": engine}
    position = data_position(args, BATCH_FLAGS, train=(len(data.train), data.train_sha256))
    state, resumed_from = resume_if_asked(args, engines, "reward", position)

    monitor = Monitor(
        args.enable_tensorboard, args.tensorboard_path or f"{args.output_dir}/tensorboard", "reward"
    )
    curve: list[dict[str, Any]] = state.extra.setdefault("eval_curve", [])

    def run_eval(max_batches: int, tag: str) -> dict[str, float]:
        metrics = evaluate(engine, eval_dl, dev, args.margin, max_batches)
        curve.append({"step": engine.global_steps, **metrics})
        log_eval(tag, engine.global_steps, metrics, monitor)
        return metrics

    if not curve:  # a resumed run has it from the checkpoint
        run_eval(args.eval_iters, "eval")

    def step(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        chosen, rejected = forward_pairs(engine, batch)
        accuracy = (chosen > rejected).float().mean()
        return pairwise_loss(chosen, rejected, args.margin).mean(), {"accuracy": accuracy}, chosen.shape[0]

    train_supervised(
        engine,
        train_dl,
        args,
        state,
        resumed_from,
        engines,
        monitor,
        stage="reward",
        unit="pairs",
        step_fn=step,
        dev=dev,
        evaluate=lambda: run_eval(args.eval_iters, "eval"),
    )
    final = run_eval(0, "final eval (whole eval set)")

    normalization, sample = normalize_reward_model(engine, tokenizer, args, data.train, dev)
    metrics = RewardModelMetrics(
        final=PairEval.from_dict(final),
        eval_curve=curve,
        normalization=normalization,
        optimizer_steps=engine.global_steps,
        skipped_nonfinite_steps=state.skipped_steps,
    )
    with final_outputs(args.output_dir, METRICS_FILE) as staged:
        save_reward_model(engine, staged, tokenizer, args.zero_stage)
        write_sample(sample, staged)
        if args.verify_save:
            batch, _ = next(iter(eval_dl))
            diff = saved_scores_max_diff(engine, staged, to_device(batch, dev))
            metrics.saved_scores_max_abs_diff = diff
            dist.print_rank0(f"[reward] saved model vs engine: max |score diff| {diff}")
    if dist.is_rank0():
        write_metrics(metrics, Path(args.output_dir) / METRICS_FILE)
    points = ", ".join(f"step {c['step']}: {c['accuracy']:.3f}" for c in curve)
    dist.print_rank0(f"[reward] accuracy curve: {points}")
    dist.print_rank0(
        f"[reward] final held-out accuracy {final['accuracy']:.4f} ({final['pairs']} pairs); "
        f"saved to {args.output_dir}"
    )
    monitor.close()
    dist.destroy()


if __name__ == "__main__":
    main()
