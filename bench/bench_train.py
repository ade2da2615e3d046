"""Stage-1 (SFT) and stage-2 (reward model) training throughput on synthetic tokens.

    python bench/bench_train.py --stage 1 --model tiny --steps 10
    python bench/bench_train.py --stage 2 --model opt-125m --seq_len 256 --batch 8

One process, the stages' own engine builders (common/training/engines.py) and losses, models from the configs in
bench/bench_ppo.py with random weights. Prints samples/s, tokens/s and peak memory (RSS on CPU, peak allocated
on a GPU) and appends a JSON line to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_ppo import MODEL_NAMES, environment, peak_memory_mb, write_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, choices=[1, 2], default=1)
    p.add_argument("--model", choices=MODEL_NAMES, default="tiny")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="Sequences per step (stage 2: pairs).")
    p.add_argument("--steps", type=int, default=10, help="Measured steps (after two warm-up steps).")
    p.add_argument("--zero_stage", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rlhf-bench-models")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results.jsonl")
    a = p.parse_args()

    from common import dist
    from common.models.forward import causal_lm_loss, position_ids_from_mask
    from common.models.loading import load_causal_lm, load_tokenizer
    from common.models.reward_model import load_reward_model_for_training
    from common.training.engines import stage_ds_config, stage_engine
    from step2_reward.main import pairwise_loss

    dist.init_distributed()
    a.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = write_model(a.model, a.workdir)
    tok = load_tokenizer(str(model_dir))
    flags = SimpleNamespace(
        zero_stage=a.zero_stage,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        dtype="auto",
        offload=False,
        gradient_clipping=1.0,
        learning_rate=1e-5,
        weight_decay=0.0,
        adam_betas=(0.9, 0.95),
        lora_dim=0,
        lora_learning_rate=None,
        lr_scheduler_type="constant",
        num_warmup_steps=0,
        num_train_epochs=1,
    )
    ds_config = stage_ds_config(flags)
    if a.stage == 1:
        model = load_causal_lm(str(model_dir), tok, dropout=0.0, ds_config=ds_config)
    else:
        model = load_reward_model_for_training(str(model_dir), tok, dropout=0.0, ds_config=ds_config)
    engine = stage_engine(model, flags, ds_config, a.steps + 2)
    dev = next(engine.module.parameters()).device
    rows = a.batch * (2 if a.stage == 2 else 1)
    gen = torch.Generator().manual_seed(0)
    low = max(tok.eos_token_id, tok.pad_token_id) + 1
    ids = torch.randint(low, len(tok), (rows, a.seq_len), generator=gen).to(dev)
    mask = torch.ones_like(ids)

    def step() -> None:
        if a.stage == 1:
            logits = engine(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
            ).logits
            loss = causal_lm_loss(logits, ids)
        else:
            scores = engine(ids, mask).scores
            loss = pairwise_loss(scores[: a.batch], scores[a.batch :]).mean()
        engine.backward(loss)
        engine.step()

    for _ in range(2):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / a.steps
    result = {
        "bench": f"stage{a.stage}",
        "model": a.model,
        "batch": a.batch,
        "seq_len": a.seq_len,
        "zero_stage": a.zero_stage,
        "steps": a.steps,
        "seconds_per_step": seconds,
        "samples_per_s": a.batch / seconds,
        "tokens_per_s": rows * a.seq_len / seconds,
        "peak_memory_mb": peak_memory_mb(),
        **environment(),
    }
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    with open(a.results, "a") as f:
        f.write(json.dumps(result) + "\n")
    dist.destroy()


if __name__ == "__main__":
    main()
