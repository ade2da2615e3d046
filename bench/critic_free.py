"""PPO next to the critic-free estimators on the bundled task, from one stage-1 and one stage-2 output, in
one run of this script.

    python bench/critic_free.py --output-dir out/critic_free          # ~12 min on 2 CPU cores

Runs `e2e_rlhf.py --tiny --step 1 2 --output-dir OUT` (skipped when OUT already holds them), then stage 3
once per method through the tiny launch script, each from the same sft/ and rm/:

    PPO (GAE)        bash launch/tiny/single_gpu.sh 3 OUT          16 prompts x 1 answer per iteration
    GRPO, Dr. GRPO, RLOO, REINFORCE++ with baseline, DAPO, GSPO
                     bash launch/tiny/single_gpu.sh <estimator> OUT 4 prompts x 4 answers per iteration
    REINFORCE++      bash launch/tiny/single_gpu.sh reinforce_pp OUT   16 prompts x 1 answer
    GRPO, gold as reward function
                     ... grpo OUT -- --reward_fn common.evaluation.gold:synthetic_gold --reward_model_coef 0
                                    --reward_ensemble_models   (none of the ensemble)
The critic-free methods take the script's STEP3_ARGS (and CRITIC_FREE_ARGS, empty in the tiny script: they
share PPO's actor lr 7.5e-5); add flags to them all with --critic-free-args='...'. Multi-seed figures:
`e2e_rlhf.py --tiny --seeds 1,2,3 --algo grpo,rloo,...` (pipeline/multiseed.py).

Every method generates the same number of answers (30 iterations x 16) and is evaluated on the same 128
held-out prompts with the same sampling, so their "before" rows are one and the same policy. Prints one table
(held-out gold mean, best and malformed shares, KL of the answers to the reference, wall time and peak
memory of stage 3), writes `critic_free.png` (held-out gold over iterations, and gold against KL) and appends
one JSON line per method to bench/results.jsonl. Wall time is the whole stage-3 process (start-up, data,
7 evaluations of 128 answers, 30 iterations); "of which iterations" sums the iterations' sampling, scoring,
advantage and update time from ppo_metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_ppo import environment  # noqa: E402
from bench.dpo_vs_ppo import figures  # noqa: E402
from common.evaluation.metrics import PolicyMetrics  # noqa: E402

# no reward model: the gold alone (and none of the launch script's ensemble members)
GOLD_FN = [
    "--reward_fn",
    "common.evaluation.gold:synthetic_gold",
    "--reward_model_coef",
    "0",
    "--reward_ensemble_models",
]
# (directory under OUT, title, launch STEP, extra flags)
METHODS = [
    ("ppo", "PPO (GAE, critic)", "3", []),
    ("grpo", "GRPO", "grpo", []),
    ("dr_grpo", "Dr. GRPO", "dr_grpo", []),
    ("rloo", "RLOO", "rloo", []),
    ("reinforce_pp", "REINFORCE++", "reinforce_pp", []),
    ("reinforce_pp_baseline", "REINFORCE++ with baseline", "reinforce_pp_baseline", []),
    ("dapo", "DAPO (GRPO, clip-higher, token mean, overlong punishment)", "dapo", []),
    ("gspo", "GSPO (GRPO, sequence-level ratio)", "gspo", []),
    ("grpo_gold", "GRPO, gold scorer as reward function", "grpo", GOLD_FN),
]


def run_method(out: Path, name: str, step: str, extra: list[str]) -> float:
    """Run one method's stage 3 through the tiny launch script into OUT/name; returns its wall time. (Its log
    goes to OUT/<step>/training.log: the launch script names the log after the step.)"""
    flags = [*extra, "--output_dir", str(out / name), "--tensorboard_path", str(out / "tensorboard" / name)]
    cmd = ["bash", "launch/tiny/single_gpu.sh", step, str(out), "--", *flags]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def method_row(out: Path, name: str, title: str, seconds: float) -> dict:
    m = PolicyMetrics.read(out / name / "ppo_metrics.json")
    return {
        "method": title,
        **figures(m.after),
        "proxy_gain": m.score_gain,
        "samples": m.extra["samples_generated"],
        "seconds": seconds,
        # the iterations alone (sampling, scoring, advantages, updates): no start-up, data or evaluation
        "iteration_seconds": sum(h["experience_seconds"] + h["training_seconds"] for h in m.history or []),
        "peak_memory_mb": m.extra["peak_memory_mb"],
        "algorithm": m.algorithm,
        "evals": [{"step": e.step, "gold_mean": e.gold_mean, "kl": e.kl} for e in m.evals],
        "before": figures(m.before),
    }


def table(rows: list[dict]) -> str:
    before = rows[0]["before"]
    lines = [
        "| policy | held-out gold | best share | malformed share | KL to reference | answers generated "
        "| stage-3 wall time | of which iterations | peak memory |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| stage-1 policy (SFT) | {before['gold_mean']:+.3f} | {before['best']:.2f} | "
        f"{before['malformed']:.2f} | 0 | | | | |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['gold_mean']:+.3f} | {r['best']:.2f} | {r['malformed']:.2f} | {r['kl']:.2f} "
            f"| {r['samples']} | {r['seconds']:.0f} s | {r['iteration_seconds']:.1f} s | {r['peak_memory_mb']:.0f} MiB |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], png: Path) -> Path:
    """Held-out gold over iterations, and held-out gold against held-out KL, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        steps = [e["step"] for e in r["evals"]]
        gold = [e["gold_mean"] for e in r["evals"]]
        kl = [e["kl"] for e in r["evals"]]
        left.plot(steps, gold, marker="o", markersize=3, label=r["method"])
        right.plot(kl, gold, marker="o", markersize=3, label=r["method"])
    left.set(title="held-out gold mean", xlabel="iteration (16 answers each)", ylabel="gold mean")
    right.set(
        title="gold against KL to the reference", xlabel="held-out KL (per sequence)", ylabel="gold mean"
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--methods", nargs="+", choices=[m[0] for m in METHODS], default=[m[0] for m in METHODS])
    p.add_argument(
        "--critic-free-args",
        default="",
        metavar="FLAGS",
        help="Flags added to every critic-free method's stage 3 (e.g. '--actor_learning_rate 1.5e-4', PPO's).",
    )
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results.jsonl")
    args = p.parse_args()
    out = args.output_dir.resolve()
    subprocess.run(
        [sys.executable, "e2e_rlhf.py", "--tiny", "--step", "1", "2", "--output-dir", str(out)],
        cwd=REPO,
        check=True,
    )
    rows = []
    for name, title, step, extra in METHODS:
        if name in args.methods:
            flags = [*extra, *(shlex.split(args.critic_free_args) if step != "3" else [])]
            rows.append(method_row(out, name, title, run_method(out, name, step, flags)))
    if len({json.dumps(r["before"]) for r in rows}) > 1:
        print("note: the methods' stage-1 evaluations differ: their held-out sampling is not the same")
    print("\n" + table(rows))
    print(f"plot: {plot(rows, out / 'critic_free.png')}")
    env = environment()
    with args.results.open("a") as f:
        for r in rows:
            record = {"bench": "critic_free", "model": "tiny", **r, "critic_free_args": args.critic_free_args}
            f.write(json.dumps({**record, **env}) + "\n")
    print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
