"""Stage 1: supervised fine-tuning of a causal LM on prompt + chosen response.

    deepspeed step1_sft/main.py --model_name_or_path facebook/opt-1.3b --data_path Dahoas/rm-static ...
    python step1_sft/main.py --model_name_or_path out/tiny --output_dir out/sft   # one process, no launcher

Reads top to bottom as the algorithm: parse flags, load tokenizer and data, build the engine, measure
held-out perplexity, train for the given epochs (perplexity after each), save a Hugging Face model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from common import dist
from common.args import add_single_model_args, data_config, parse_stage_args
from common.checkpoint import (
    append_train_log,
    check_finite_grad_norm,
    check_finite_loss,
    check_output_dir,
    claim_output_dir,
    data_position,
    epoch_batches,
    resume_if_asked,
    save_checkpoint,
)
from common.data import SFTCollator, build_stage_data
from common.errors import exit_cleanly_on_user_errors
from common.files import final_outputs, write_text_atomic
from common.model import (
    causal_lm_loss,
    load_tokenizer,
    position_ids_from_mask,
    save_hf_model,
    saved_logits_max_diff,
)
from common.monitor import Monitor, progress
from common.training import (
    device,
    eval_loader,
    set_seed,
    stage_causal_lm,
    stage_ds_config,
    stage_engine,
    to_device,
    train_loader,
)
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
    exit_cleanly_on_user_errors()
    args = parse_args(argv)
    dist.init_distributed()
    validate_sft(args)  # model path and weights, tokenizer vs vocabulary, lengths, LoRA names
    check_output_dir(args.output_dir, "sft", args)
    set_seed(args.seed)
    dev = device()

    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code, args.apply_chat_template)
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
    engine.train()  # from_pretrained returns eval mode; a resumed run skips the eval that switched it
    for epoch in range(state.epoch, args.num_train_epochs):
        skip = state.batches_in_epoch if epoch == state.epoch else 0
        batches = epoch_batches(train_dl, epoch, skip, resumed_from if epoch == state.epoch else None)
        tick, window_tokens, window_losses = time.perf_counter(), 0, []
        for i, batch in progress(batches, total=len(train_dl) - skip, desc=f"sft epoch {epoch + 1}"):
            batch = to_device(batch, dev)
            loss, _ = forward_loss(engine, batch)
            step = engine.global_steps + 1
            if not check_finite_loss(loss, stage="sft", step=step, skip=args.skip_nonfinite_steps):
                state.skipped_steps += 1
                continue
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            window_tokens += int(batch["attention_mask"].sum())
            window_losses.append(loss.detach())
            if not boundary:
                continue
            check_finite_grad_norm(engine, stage="sft", step=step)
            mean_loss = dist.all_reduce_mean(torch.stack(window_losses).mean()).item()
            tokens_per_s = window_tokens * dist.get_world_size() / (time.perf_counter() - tick)
            if args.print_loss:
                dist.print_rank0(f"[sft] epoch {epoch + 1} step {step} loss {mean_loss:.4f}")
            monitor.log(
                {"train/loss": mean_loss, "train/lr": engine.get_lr()[0], "train/tokens_per_s": tokens_per_s},
                step,
            )
            append_train_log(args.output_dir, {"step": step, "loss": mean_loss})
            if args.save_interval and step % args.save_interval == 0:
                state.step, state.epoch, state.batches_in_epoch = step, epoch, i + 1
                save_checkpoint(args.output_dir, engines, state, args.save_total_limit)
            tick, window_tokens, window_losses = time.perf_counter(), 0, []
        ppl = evaluate_perplexity(engine, eval_dl, dev)
        curve.append(ppl)
        dist.print_rank0(f"[sft] epoch {epoch + 1}/{args.num_train_epochs}: held-out perplexity {ppl:.3f}")
        monitor.log({"eval/perplexity": ppl}, engine.global_steps)

    metrics = {
        "perplexity_per_epoch": curve,
        "optimizer_steps": engine.global_steps,
        "skipped_nonfinite_steps": state.skipped_steps,
    }
    with final_outputs(args.output_dir, METRICS_FILE) as staged:
        save_hf_model(engine, staged, tokenizer, args.zero_stage)
        if args.verify_save:
            batch, _ = next(iter(eval_dl))
            diff = saved_logits_max_diff(engine, staged, to_device(batch, dev))
            metrics["saved_logits_max_abs_diff"] = diff
            dist.print_rank0(f"[sft] saved model vs engine: max |logit diff| {diff}")
    if dist.is_rank0():
        write_text_atomic(Path(args.output_dir) / METRICS_FILE, json.dumps(metrics, indent=2))
    dist.print_rank0(f"[sft] saved to {args.output_dir}; perplexity curve {[round(p, 3) for p in curve]}")
    monitor.close()
    dist.destroy()


if __name__ == "__main__":
    main()
