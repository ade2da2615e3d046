"""Stage 1: supervised fine-tuning of a causal LM on prompt + chosen response.

    deepspeed step1_sft/main.py --model_name_or_path facebook/opt-1.3b --data_path Dahoas/rm-static ...
    python step1_sft/main.py --model_name_or_path out/tiny --output_dir out/sft   # one process, no launcher

Reads top to bottom as the algorithm: parse flags, load tokenizer and data, build the engine, measure
held-out perplexity, train for the given epochs (perplexity after each), save a Hugging Face model.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from common import dist
from common.args import add_single_model_args, data_config, parse_stage_args
from common.data import SFTCollator, build_stage_data
from common.evaluation.metrics import SFTMetrics, write_metrics
from common.files import final_outputs
from common.models.forward import causal_lm_loss, position_ids_from_mask
from common.models.saving import save_hf_model, saved_logits_max_diff
from common.training.checkpoint import data_position, resume_if_asked
from common.training.engines import (
    eval_loader,
    stage_causal_lm,
    stage_ds_config,
    stage_engine,
    to_device,
    train_loader,
)
from common.training.monitor import Monitor
from common.training.output_dir import claim_output_dir
from common.training.stage import start_stage
from common.training.supervised import train_supervised
from common.validate import validate_sft

METRICS_FILE = "sft_metrics.json"  # written last: the stage finished


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stage 1: supervised fine-tuning")
    add_single_model_args(parser, stage=1)
    return parse_stage_args(parser, argv)


def forward_loss(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean token loss of a batch and its number of target tokens."""
    out = engine(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids_from_mask(batch["attention_mask"]),
        use_cache=False,
    )
    loss = causal_lm_loss(out.logits, batch["labels"])
    return loss, int((batch["labels"][:, 1:] != -100).sum())


@torch.no_grad()
def evaluate_perplexity(engine, loader, dev: torch.device) -> float:
    """exp(token-weighted mean NLL) over the whole eval set, summed across ranks."""
    engine.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=dev)
    tokens = torch.zeros((), dtype=torch.float64, device=dev)
    for batch, real in loader:
        batch = to_device(batch, dev)
        batch["labels"][~real.to(dev)] = -100  # placeholders contribute nothing
        loss, n = forward_loss(engine, batch)
        if n:
            nll_sum += loss.double() * n
            tokens += n
    stats = torch.stack([nll_sum, tokens])
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(stats)
    engine.train()
    return math.exp(min(stats[0].item() / max(stats[1].item(), 1.0), 50.0))


# What the order of training rows depends on (with the data and the world size).
BATCH_FLAGS = ("seed", "per_device_train_batch_size", "gradient_accumulation_steps")


def main(argv: list[str] | None = None) -> None:
    args, dev, tokenizer = start_stage("sft", argv, parse_args, validate_sft)
    data = build_stage_data(data_config(args), tokenizer, stage=1)
    collate = SFTCollator(tokenizer.pad_token_id)
    train_dl = train_loader(data.train, collate, args.per_device_train_batch_size, args.seed)
    eval_dl = eval_loader(data.eval, collate, args.per_device_eval_batch_size)

    ds_config = stage_ds_config(args)
    model = stage_causal_lm(args, tokenizer, ds_config, dropout=args.dropout)
    engine = stage_engine(model, args, ds_config, len(train_dl))

    claim_output_dir(args.output_dir, "sft", args)
    engines = {"model": engine}
    position = data_position(args, BATCH_FLAGS, train=(len(data.train), data.train_sha256))
    state, resumed_from = resume_if_asked(args, engines, "sft", position)

    monitor = Monitor(
        args.enable_tensorboard, args.tensorboard_path or f"{args.output_dir}/tensorboard", "sft"
    )
    curve = state.extra.setdefault("perplexity_per_epoch", [])
    if not curve:  # a resumed run has it from the checkpoint
        ppl = evaluate_perplexity(engine, eval_dl, dev)
        dist.print_rank0(f"[sft] epoch 0/{args.num_train_epochs}: held-out perplexity {ppl:.3f}")
        monitor.log({"eval/perplexity": ppl}, 0)
        curve.append(ppl)

    def step(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        loss, _ = forward_loss(engine, batch)
        return loss, {}, int(batch["attention_mask"].sum())

    def evaluate_after(epoch: int) -> None:
        ppl = evaluate_perplexity(engine, eval_dl, dev)
        curve.append(ppl)
        dist.print_rank0(f"[sft] epoch {epoch + 1}/{args.num_train_epochs}: held-out perplexity {ppl:.3f}")
        monitor.log({"eval/perplexity": ppl}, engine.global_steps)

    train_supervised(
        engine,
        train_dl,
        args,
        state,
        resumed_from,
        engines,
        monitor,
        stage="sft",
        unit="tokens",
        step_fn=step,
        dev=dev,
        after_epoch=evaluate_after,
    )

    metrics = SFTMetrics(curve, engine.global_steps, state.skipped_steps)
    with final_outputs(args.output_dir, METRICS_FILE) as staged:
        save_hf_model(engine, staged, tokenizer, args.zero_stage)
        if args.verify_save:
            batch, _ = next(iter(eval_dl))
            diff = saved_logits_max_diff(engine, staged, to_device(batch, dev))
            metrics.saved_logits_max_abs_diff = diff
            dist.print_rank0(f"[sft] saved model vs engine: max |logit diff| {diff}")
    if dist.is_rank0():
        write_metrics(metrics, Path(args.output_dir) / METRICS_FILE)
    dist.print_rank0(f"[sft] saved to {args.output_dir}; perplexity curve {[round(p, 3) for p in curve]}")
    monitor.close()
    dist.destroy()


if __name__ == "__main__":
    main()
