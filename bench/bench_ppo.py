"""Stage-3 (PPO) benchmark: seconds per iteration split into generation, experience forwards and training.

    python bench/bench_ppo.py --model tiny --compare
    python bench/bench_ppo.py --model opt-125m --batch 4 --compare kv,naive,logits
    python bench/bench_ppo.py --model opt-125m --batch 4 --actor_zero_stage 3 --compare gather
    python bench/bench_ppo.py --model opt-1.3b --prompt_len 256 --answer_len 256 --batch 8 --iterations 2 \\
        --memory_fraction 0.3 -- --dtype fp16 --per_device_training_batch_size 4 --gradient_accumulation_steps 2 \\
        --actor_gradient_checkpointing --critic_gradient_checkpointing --offload     # on a GPU

One process, the real engines of step3_rlhf (ZeRO stage per --actor_zero_stage), models built from configs
typed below with random weights (nothing is downloaded) and synthetic token prompts. Random weights rarely
emit EOS, so every answer runs to --answer_len tokens: the generated length is fixed, as a benchmark wants.
Flags after `--` go to stage 3's own parser (dtype, gradient checkpointing, offload, LoRA, hybrid engine...).
Prints a table and appends one JSON line (figures, hardware, versions, git commit) to bench/results.jsonl.

--compare [kv,naive,logits,zero,gather] (alone: all five) adds ratios measured in the same process on the same
inputs, the arms interleaved (A B A B ..., --repeats rounds, medians) so that other load hits both alike:
  kv      generation without / with the KV cache;
  naive   the naive loop of a textbook PPO-for-LLMs implementation (a separate full forward per sample
          and model, no batching)
          / our experience maker (one batched forward per model);
  logits  actor and reference log-prob forwards computing the vocabulary logits at every position / at
          the response positions only (`common.models.forward.response_logits`); on a GPU also their peak memory;
  zero    seconds per iteration with the actor under ZeRO-3 / ZeRO-2;
  gather  ZeRO-3 actor: generation and iteration with per-decode-step all-gathers
          (--no-gather_actor_for_generation) / with the actor gathered once per generation (the default
          where the copy fits).
On a GPU the run also reports the memory-bandwidth bound of generation (actor weight bytes read per decode
step x decode steps / measured copy bandwidth) and, with --memory_fraction, whether it fits under that cap.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.training.engines import peak_memory_mb  # noqa: E402

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
# SmolLM2-135M(-Instruct)'s architecture (Llama: grouped-query attention, tied embeddings; the model of
# launch/smollm2/ and tests/runs/test_real_model.py), with random weights like the others.
LLAMA_CONFIGS = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
}
CRITIC_FOR = {
    "opt-125m": "opt-125m",
    "opt-350m": "opt-350m",
    "opt-1.3b": "opt-350m",
    "smollm2-135m": "smollm2-135m",
    "tiny": "tiny",
}
MODEL_NAMES = ["tiny", *CONFIGS, *LLAMA_CONFIGS]
COMPARISONS = ("kv", "naive", "logits", "zero", "gather")
PHASES = ("actor_forward", "reference_forward", "critic_forward", "reward_forward")


def write_model(name: str, root: Path) -> Path:
    """A model directory for `name` with the tiny tokenizer (ids < its vocab are all we sample)."""
    from transformers import OPTConfig, OPTForCausalLM

    from tools.tiny import write_tiny

    tiny = write_tiny(root / "tiny", arch="opt", seed=0) if not (root / "tiny").exists() else root / "tiny"
    if name == "tiny":
        return tiny
    out = root / name
    if out.exists():
        return out
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny)
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    if name in LLAMA_CONFIGS:
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIGS[name], attention_dropout=0.0, **ids))
    else:
        model = OPTForCausalLM(OPTConfig(**CONFIGS[name], dropout=0.0, attention_dropout=0.0, **ids))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_reward_model(actor_like: Path, root: Path) -> Path:
    from common.models.loading import load_tokenizer
    from common.models.reward_model import load_reward_model_for_training
    from common.models.saving import save_reward_model

    out = root / f"rm-{actor_like.name}"
    if not out.exists():
        tok = load_tokenizer(str(actor_like))
        save_reward_model(load_reward_model_for_training(str(actor_like), tok), out, tok, 0)
    return out


def environment() -> dict:
    import deepspeed
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    )
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "git_commit": commit.stdout.strip() + ("+changes" if changed.stdout.strip() else ""),
    }


# ------------------------------------------------------------------------------------------ the engines


@dataclass
class Setup:
    """Stage-3 engines with the actor at one ZeRO stage, and the fixed synthetic prompt batch (B, P)."""

    args: argparse.Namespace
    engines: object
    maker: object
    trainer: object
    batch: dict[str, torch.Tensor]


def build(a: argparse.Namespace, actor_dir: Path, rm_dir: Path, actor_zero_stage: int) -> Setup:
    """Engines, experience maker and trainer as step3_rlhf/main.py builds them, plus `a.batch` prompts of
    `a.prompt_len` random non-special tokens (the same prompts for every setup of a run)."""
    from common.models.loading import load_tokenizer
    from common.rl_math import FixedKLController
    from step3_rlhf.args import parse_args
    from step3_rlhf.engines import build_engines
    from step3_rlhf.experience import ExperienceMaker
    from step3_rlhf.ppo_trainer import PPOTrainer

    args = parse_args(
        [
            *("--actor_model_name_or_path", str(actor_dir), "--critic_model_name_or_path", str(rm_dir)),
            *("--output_dir", str(a.workdir / "out"), "--actor_zero_stage", str(actor_zero_stage)),
            *("--per_device_generation_batch_size", str(a.batch)),
            *("--per_device_training_batch_size", str(a.batch)),
            *("--max_prompt_seq_len", str(a.prompt_len), "--max_answer_seq_len", str(a.answer_len)),
            *("--actor_learning_rate", "1e-6", "--critic_learning_rate", "1e-6"),
            *a.step3_flags,
        ]
    )
    tok = load_tokenizer(str(actor_dir))
    engines = build_engines(args, tok, 100, 100)
    zero3 = actor_zero_stage == 3
    maker = ExperienceMaker(engines, tok, args, FixedKLController(args.init_kl_coef), zero3)
    trainer = PPOTrainer(engines, args, None, zero3)
    dev = next(engines.critic.module.parameters()).device
    low = max(tok.eos_token_id, tok.pad_token_id) + 1
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(low, len(tok), (a.batch, a.prompt_len), generator=gen).to(dev)
    batch = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}
    return Setup(args, engines, maker, trainer, batch)


def iteration(s: Setup) -> dict[str, float]:
    """One PPO iteration (one generation batch, one pass of training) -> seconds per phase:
    generation, the four experience forwards, experience (all of making), training; and generated tokens."""
    s.maker.seconds.clear()
    start = time.perf_counter()
    rollout = s.maker.make_rollout([s.batch])
    experience = time.perf_counter() - start
    start = time.perf_counter()
    s.trainer.train(rollout)
    return {
        **s.maker.seconds,
        "experience": experience,
        "training": time.perf_counter() - start,
        "generated_tokens": float(rollout.action_mask.sum()),
    }


def summarize(row: dict[str, float], batch: int, prompt_len: int) -> dict[str, float]:
    """Per-phase seconds of one (mean) iteration -> the reported figures."""
    per_iteration = row["experience"] + row["training"]
    return {
        "seconds_per_iteration": per_iteration,
        "generation_s": row["generation"],
        "experience_forwards_s": sum(row[k] for k in PHASES),
        **{f"{k}_s": row[k] for k in PHASES},
        "training_s": row["training"],
        "generation_tokens_per_s": row["generated_tokens"] / row["generation"],
        "samples_per_s": batch / per_iteration,
        "tokens_per_s": (batch * prompt_len + row["generated_tokens"]) / per_iteration,
    }


def measure(s: Setup, a: argparse.Namespace) -> dict[str, float]:
    """One warm-up iteration, then the mean of `a.iterations`."""
    iteration(s)
    rows = [iteration(s) for _ in range(a.iterations)]
    return summarize({k: statistics.fmean(r[k] for r in rows) for k in rows[0]}, a.batch, a.prompt_len)


# ------------------------------------------------------------------------------------------ comparisons


def interleaved(arms: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Run the arms in turn, A B C A B C ..., `repeats` rounds; per arm the median of what it returned."""
    out: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, arm in arms.items():
            out[name].append(arm())
    return {name: statistics.median(v) for name, v in out.items()}


def compare_kv_cache(s: Setup, repeats: int) -> dict[str, float]:
    """Generation seconds with and without the KV cache on the setup's prompts."""

    def generation(use_cache: bool) -> Callable[[], float]:
        def arm() -> float:
            s.args.generation_use_cache = use_cache
            s.maker.seconds.clear()
            s.maker.sample(s.batch["input_ids"], s.batch["attention_mask"])
            return s.maker.seconds["generation"]

        return arm

    t = interleaved({"with": generation(True), "without": generation(False)}, repeats)
    s.args.generation_use_cache = True
    return {
        "generation_with_cache_s": t["with"],
        "generation_without_cache_s": t["without"],
        "generation_without_over_with_cache": t["without"] / t["with"],
    }


def naive_experience(
    engines, seq: torch.Tensor, attn: torch.Tensor, prompt_len: int, temperature: float
) -> None:
    """The seed's loop: one sample at a time, each model a separate full forward, no batching."""
    from common.models.forward import position_ids_from_mask
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


def compare_naive(s: Setup, repeats: int) -> dict[str, float]:
    """The four experience forwards of one sampled batch: the naive per-sample loop / ours, batched."""
    answers = s.maker.sample(s.batch["input_ids"], s.batch["attention_mask"])
    seq, attn = answers.seq, answers.attention_mask
    prompt_len = s.batch["input_ids"].shape[1]

    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        def arm() -> float:
            start = time.perf_counter()
            with torch.no_grad():
                fn()
            return time.perf_counter() - start

        return arm

    t = interleaved(
        {
            "naive": timed(lambda: naive_experience(s.engines, seq, attn, prompt_len, s.args.temperature)),
            "batched": timed(lambda: s.maker.score(seq, attn, prompt_len)),
        },
        repeats,
    )
    return {
        "naive_experience_forwards_s": t["naive"],
        "batched_experience_forwards_s": t["batched"],
        "naive_over_batched_experience_forwards": t["naive"] / t["batched"],
    }


def compare_logits(s: Setup, repeats: int) -> dict[str, float]:
    """Actor + reference log-prob forwards of one sampled batch: logits at every position, then sliced (as
    before 2026-11-21 and in the seeds) / logits at the response positions only (what stage 3 does)."""
    from common.models.forward import position_ids_from_mask, response_logits
    from common.rl_math import logprobs_from_logits, response_positions

    answers = s.maker.sample(s.batch["input_ids"], s.batch["attention_mask"])
    seq, attn = answers.seq, answers.attention_mask
    prompt_len, t = s.batch["input_ids"].shape[1], s.args.temperature
    answer = seq[:, prompt_len:]
    kw = {
        "input_ids": seq,
        "attention_mask": attn,
        "position_ids": position_ids_from_mask(attn),
        "use_cache": False,
    }
    peak: dict[str, float] = {}

    def timed(name: str, logits_of: Callable[[torch.nn.Module], torch.Tensor]) -> Callable[[], float]:
        def arm() -> float:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with torch.no_grad():
                for engine in (s.engines.actor, s.engines.ref):
                    logprobs_from_logits(logits_of(engine), answer, t)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                peak[name] = torch.cuda.max_memory_allocated() / 2**20
            return time.perf_counter() - start

        return arm

    t_ = interleaved(
        {
            "full": timed("full", lambda e: response_positions(e(**kw).logits, prompt_len)),
            "response": timed("response", lambda e: response_logits(e, seq, attn, prompt_len)),
        },
        repeats,
    )
    out = {
        "full_logits_forwards_s": t_["full"],
        "response_logits_forwards_s": t_["response"],
        "full_over_response_logits_forwards": t_["full"] / t_["response"],
    }
    if peak:
        out.update(
            full_logits_forwards_peak_mb=peak["full"],
            response_logits_forwards_peak_mb=peak["response"],
        )
    return out


def compare_actor_stages(
    setups: dict[int, Setup], a: argparse.Namespace, zero: bool, gather: bool
) -> dict[str, float]:
    """Full PPO iterations, interleaved: the actor under ZeRO-2 and ZeRO-3 (`zero`); the ZeRO-3 actor gathered
    once per generation and gathering at every decode step (`gather`). Each arm is warmed up once first."""

    def arm(stage: int, gather_once: bool) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            setups[stage].args.gather_actor_for_generation = gather_once
            return iteration(setups[stage])

        return run

    arms = {}
    if zero:
        arms["actor_zero2"] = arm(2, True)
    arms["actor_zero3"] = arm(3, True)
    if gather:
        arms["actor_zero3_per_step"] = arm(3, False)
    for run in arms.values():
        run()  # warm-up
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    for _ in range(a.repeats):
        for name, run in arms.items():
            rows[name].append(run())
    setups[3].args.gather_actor_for_generation = True
    out: dict[str, float] = {}
    for name, rs in rows.items():
        f = summarize({k: statistics.median(r[k] for r in rs) for k in rs[0]}, a.batch, a.prompt_len)
        out.update(
            {f"{name}_s_per_iteration": f["seconds_per_iteration"], f"{name}_generation_s": f["generation_s"]}
        )
    if zero:
        out["actor_zero3_over_zero2"] = (
            out["actor_zero3_s_per_iteration"] / out["actor_zero2_s_per_iteration"]
        )
    if gather:
        for figure in ("s_per_iteration", "generation_s"):
            per_step, once = out[f"actor_zero3_per_step_{figure}"], out[f"actor_zero3_{figure}"]
            out[f"actor_zero3_per_step_over_gathered_{figure}"] = per_step / once
    return out


# ---------------------------------------------------------------------------------------------- GPU only


def copy_bandwidth_gb_s(gib: float = 0.25, repeats: int = 20) -> float:
    """Device memory bandwidth measured by copying a `gib` GiB buffer, far larger than any GPU's L2 cache
    (bytes read + bytes written per second)."""
    x = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        y.copy_(x)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return 2 * x.numel() * x.element_size() * repeats / seconds / 1e9


def bandwidth_bound(s: Setup, generation_s: float, answer_len: int) -> dict[str, float]:
    """Generation time against its floor on a GPU: each of the `answer_len` forwards of generate (the
    prefill and every decode step) reads all actor weights once, so it needs at least
    weight bytes x answer_len / bandwidth (KV-cache reads, which add to that, are left out)."""
    params = list(s.engines.actor.module.parameters())
    weight_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
    bandwidth = copy_bandwidth_gb_s()
    bound = weight_bytes * answer_len / (bandwidth * 1e9)
    return {
        "actor_weight_gb": weight_bytes / 1e9,
        "copy_bandwidth_gb_s": bandwidth,
        "generation_bandwidth_bound_s": bound,
        "generation_over_bandwidth_bound": generation_s / bound,
    }


# ------------------------------------------------------------------------------------------------- main


def parse(argv: list[str]) -> argparse.Namespace:
    """The bench's flags; everything after `--` is kept, as `step3_flags`, for stage 3's parser."""
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=MODEL_NAMES, default="tiny")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--answer_len", type=int, default=64)
    p.add_argument(
        "--batch",
        type=int,
        default=8,
        help="Prompts per generation batch, and the training micro-batch unless set after `--`.",
    )
    p.add_argument("--iterations", type=int, default=3, help="Measured PPO iterations (after one warm-up).")
    p.add_argument("--actor_zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument(
        "--compare",
        nargs="?",
        const=",".join(COMPARISONS),
        default="",
        help=f"Comma-separated comparisons among {','.join(COMPARISONS)}; alone: all of them.",
    )
    p.add_argument("--repeats", type=int, default=2, help="Interleaved rounds of each comparison's arms.")
    p.add_argument(
        "--memory_fraction",
        type=float,
        default=None,
        help="GPU only: cap this process at this fraction of the card (set_per_process_memory_fraction), "
        "e.g. 24 GB of an 80 GB card: 0.3.",
    )
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rlhf-bench-models")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results.jsonl")
    a = p.parse_args(argv[:cut])
    a.step3_flags = argv[cut + 1 :]
    a.compare = [c for c in a.compare.split(",") if c]
    unknown = set(a.compare) - set(COMPARISONS)
    if unknown:
        p.error(f"--compare: unknown {sorted(unknown)}; choose among {', '.join(COMPARISONS)}")
    return a


def cap_gpu_memory(fraction: float | None) -> dict[str, float]:
    if fraction is None or not torch.cuda.is_available():
        return {}
    torch.cuda.set_per_process_memory_fraction(fraction)
    return {"memory_cap_gb": fraction * torch.cuda.get_device_properties(0).total_memory / 1e9}


def run(a: argparse.Namespace, actor_dir: Path, rm_dir: Path) -> dict:
    """The main measurement, then the comparisons asked for. The first engine set is freed before the
    ZeRO-2 / ZeRO-3 ones are built (unless it is one of them), so at most two sets are alive at once."""
    first = build(a, actor_dir, rm_dir, a.actor_zero_stage)
    result = measure(first, a)
    result["peak_memory_mb"] = peak_memory_mb()  # before anything else allocates
    if torch.cuda.is_available():
        result.update(bandwidth_bound(first, result["generation_s"], a.answer_len))
    if "kv" in a.compare:
        result.update(compare_kv_cache(first, a.repeats))
    if "naive" in a.compare:
        result.update(compare_naive(first, a.repeats))
    if "logits" in a.compare:
        result.update(compare_logits(first, a.repeats))
    zero, gather = "zero" in a.compare, "gather" in a.compare
    if zero or gather:
        wanted = ([2] if zero else []) + [3]
        setups = {a.actor_zero_stage: first} if a.actor_zero_stage in wanted else {}
        del first
        gc.collect()
        for stage in wanted:
            setups.setdefault(stage, build(a, actor_dir, rm_dir, stage))
        result.update(compare_actor_stages(setups, a, zero, gather))
        result["peak_memory_with_comparisons_mb"] = peak_memory_mb()
    return result


def main() -> None:
    a = parse(sys.argv[1:])
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
        "repeats": a.repeats if a.compare else 0,
        "step3_flags": " ".join(a.step3_flags),
        **cap_gpu_memory(a.memory_fraction),
    }
    try:
        result.update(run(a, actor_dir, rm_dir))
    except torch.cuda.OutOfMemoryError as err:  # a GPU smaller than the run, or --memory_fraction
        result.update(fits=False, error=str(err).splitlines()[0], peak_memory_mb=peak_memory_mb())
    else:
        if "memory_cap_gb" in result:
            result["fits"] = True
    result.update(environment())
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    with open(a.results, "a") as f:
        f.write(json.dumps(result) + "\n")
    dist.destroy()


if __name__ == "__main__":
    main()
