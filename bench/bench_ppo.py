"""Stage-3 (PPO) benchmark: seconds per iteration split into generation, experience forwards and training.

    python bench/bench_ppo.py --model tiny --iterations 3
    python bench/bench_ppo.py --model opt-125m --prompt_len 64 --answer_len 64 --batch 8 --compare

One process, the real engines of step3_rlhf (ZeRO stage per --actor_zero_stage), models built from configs
typed below with random weights (nothing is downloaded) and synthetic token prompts. Random weights rarely
emit EOS, so every answer runs to --answer_len tokens: the generated length is fixed, as a benchmark wants.
Prints a table and appends one JSON line (figures, hardware, versions, git commit) to bench/results.jsonl.

--compare adds, measured in the same process on the same inputs:
  - generation with and without the KV cache;
  - our experience maker (one batched forward per model) against the naive loop of
    ../shared/seeds/002 (a separate full forward per sample and model, no batching).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Architectures of the public checkpoints, typed in (random weights; no download).
CONFIGS = {
    "opt-125m": dict(
        hidden_size=768,
        num_hidden_layers=12,
        ffn_dim=3072,
        num_attention_heads=12,
        word_embed_proj_dim=768,
        vocab_size=50272,
        max_position_embeddings=2048,
    ),
    "opt-350m": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        ffn_dim=4096,
        num_attention_heads=16,
        word_embed_proj_dim=512,
        vocab_size=50272,
        max_position_embeddings=2048,
    ),
    "opt-1.3b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        ffn_dim=8192,
        num_attention_heads=32,
        word_embed_proj_dim=2048,
        vocab_size=50272,
        max_position_embeddings=2048,
    ),
}
CRITIC_FOR = {"opt-125m": "opt-125m", "opt-350m": "opt-350m", "opt-1.3b": "opt-350m", "tiny": "tiny"}


def write_model(name: str, root: Path) -> Path:
    """A model directory for `name` with the tiny tokenizer (ids < its vocab are all we sample)."""
    from transformers import OPTConfig, OPTForCausalLM

    from common.tiny import write_tiny

    tiny = write_tiny(root / "tiny", arch="opt", seed=0) if not (root / "tiny").exists() else root / "tiny"
    if name == "tiny":
        return tiny
    out = root / name
    if out.exists():
        return out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = OPTConfig(
        **CONFIGS[name],
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    OPTForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_reward_model(actor_like: Path, root: Path) -> Path:
    from common.model import load_tokenizer
    from common.reward_model import load_reward_model_for_training, save_reward_model

    out = root / f"rm-{actor_like.name}"
    if not out.exists():
        tok = load_tokenizer(str(actor_like))
        save_reward_model(load_reward_model_for_training(str(actor_like), tok), out, tok, 0)
    return out


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def environment() -> dict:
    import deepspeed
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "git_commit": commit.stdout.strip(),
    }


def naive_experience(
    engines, seq: torch.Tensor, attn: torch.Tensor, prompt_len: int, temperature: float
) -> None:
    """The seed's loop: one sample at a time, each model a separate full forward, no batching."""
    from common.model import position_ids_from_mask
    from common.rl_math import response_logprobs

    for i in range(seq.shape[0]):
        s, m = seq[i : i + 1], attn[i : i + 1]
        kw = {
            "input_ids": s,
            "attention_mask": m,
            "position_ids": position_ids_from_mask(m),
            "use_cache": False,
        }
        response_logprobs(engines.actor(**kw).logits, s, prompt_len, temperature)
        response_logprobs(engines.ref(**kw).logits, s, prompt_len, temperature)
        engines.critic(s, m)
        engines.reward(s, m, normalize=True)


def measure(
    a: argparse.Namespace, actor_dir: Path, rm_dir: Path, actor_zero_stage: int, compare: bool
) -> dict:
    """Build the stage-3 engines (actor at `actor_zero_stage`) and time warm-up + `a.iterations` PPO
    iterations on fixed synthetic prompts; with `compare`, also the KV-cache and naive-loop comparisons."""
    from common.model import load_tokenizer
    from common.rl_math import FixedKLController
    from step3_rlhf.args import parse_args
    from step3_rlhf.engines import build_engines
    from step3_rlhf.experience import ExperienceMaker
    from step3_rlhf.ppo_trainer import PPOTrainer

    args = parse_args(
        [
            "--actor_model_name_or_path",
            str(actor_dir),
            "--critic_model_name_or_path",
            str(rm_dir),
            "--output_dir",
            str(a.workdir / "out"),
            "--per_device_generation_batch_size",
            str(a.batch),
            "--per_device_training_batch_size",
            str(a.batch),
            "--max_prompt_seq_len",
            str(a.prompt_len),
            "--max_answer_seq_len",
            str(a.answer_len),
            "--actor_zero_stage",
            str(actor_zero_stage),
            "--actor_learning_rate",
            "1e-6",
            "--critic_learning_rate",
            "1e-6",
        ]
    )
    tok = load_tokenizer(str(actor_dir))
    engines = build_engines(args, tok, 100, 100)
    zero3 = actor_zero_stage == 3
    maker = ExperienceMaker(engines, tok, args, FixedKLController(args.init_kl_coef), zero3)
    trainer = PPOTrainer(engines, args, None, zero3)
    dev = next(engines.critic.module.parameters()).device
    gen = torch.Generator().manual_seed(0)
    low = max(tok.eos_token_id, tok.pad_token_id) + 1
    prompts = torch.randint(low, len(tok), (a.batch, a.prompt_len), generator=gen).to(dev)
    batch = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}

    rows = []
    for it in range(a.iterations + 1):  # iteration 0 warms up
        maker.seconds.clear()
        start = time.perf_counter()
        rollout = maker.make_rollout([batch])
        experience = time.perf_counter() - start
        start = time.perf_counter()
        trainer.train(rollout)
        training = time.perf_counter() - start
        if it:
            rows.append(
                {
                    **maker.seconds,
                    "experience": experience,
                    "training": training,
                    "generated_tokens": int(rollout.action_mask.sum()),
                }
            )
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    phases = ("actor_forward", "reference_forward", "critic_forward", "reward_forward")
    per_iteration = mean["experience"] + mean["training"]
    result = {
        "seconds_per_iteration": per_iteration,
        "generation_s": mean["generation"],
        "experience_forwards_s": sum(mean[k] for k in phases),
        **{f"{k}_s": mean[k] for k in phases},
        "training_s": mean["training"],
        "generation_tokens_per_s": mean["generated_tokens"] / mean["generation"],
        "samples_per_s": a.batch / per_iteration,
        "tokens_per_s": (a.batch * a.prompt_len + mean["generated_tokens"]) / per_iteration,
    }
    if compare:

        def generation_seconds(use_cache: bool) -> float:
            args.generation_use_cache = use_cache
            maker.seconds.clear()
            maker.sample(prompts, batch["attention_mask"])
            return maker.seconds["generation"]

        with_cache, no_cache = generation_seconds(True), generation_seconds(False)
        args.generation_use_cache = True
        result.update(
            generation_with_cache_s=with_cache,
            generation_without_cache_s=no_cache,
            generation_without_over_with_cache=no_cache / with_cache,
        )
        seq, attn, _, _ = maker.sample(prompts, batch["attention_mask"])
        start = time.perf_counter()
        with torch.no_grad():
            naive_experience(engines, seq, attn, a.prompt_len, args.temperature)
        naive = time.perf_counter() - start
        start = time.perf_counter()
        maker.score(seq, attn, a.prompt_len)
        result["naive_over_batched_experience_forwards"] = naive / (time.perf_counter() - start)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", *CONFIGS], default="tiny")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--answer_len", type=int, default=64)
    p.add_argument(
        "--batch", type=int, default=8, help="Prompts per generation batch (= training micro-batch)."
    )
    p.add_argument("--iterations", type=int, default=3, help="Measured PPO iterations (after one warm-up).")
    p.add_argument("--actor_zero_stage", type=int, default=0)
    p.add_argument(
        "--compare",
        action="store_true",
        help="Also: KV cache on/off, naive loop vs batched forwards, actor ZeRO-2 vs ZeRO-3.",
    )
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rlhf-bench-models")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results.jsonl")
    a = p.parse_args()

    from common import dist

    dist.init_distributed()
    a.workdir.mkdir(parents=True, exist_ok=True)
    actor_dir = write_model(a.model, a.workdir)
    rm_dir = make_reward_model(write_model(CRITIC_FOR[a.model], a.workdir), a.workdir)
    result = {
        "bench": "ppo",
        "model": a.model,
        "critic": CRITIC_FOR[a.model],
        "batch": a.batch,
        "prompt_len": a.prompt_len,
        "answer_len": a.answer_len,
        "actor_zero_stage": a.actor_zero_stage,
        "iterations": a.iterations,
        **measure(a, actor_dir, rm_dir, a.actor_zero_stage, a.compare),
    }
    if a.compare:
        z2 = measure(a, actor_dir, rm_dir, 2, False)["seconds_per_iteration"]
        z3 = measure(a, actor_dir, rm_dir, 3, False)["seconds_per_iteration"]
        result.update(
            actor_zero2_s_per_iteration=z2, actor_zero3_s_per_iteration=z3, actor_zero3_over_zero2=z3 / z2
        )
    result["peak_memory_mb"] = peak_memory_mb()
    result.update(environment())
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    with open(a.results, "a") as f:
        f.write(json.dumps(result) + "\n")
    dist.destroy()


if __name__ == "__main__":
    main()
