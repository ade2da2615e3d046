"""What each defence against over-optimisation does on the gold, over seeds, on the tiny default.

    python bench/defences.py --output-dir out/defences --seeds 1,2,3,4,5 --jobs 2
    python bench/defences.py --output-dir out/defences --seeds 1,2,3 --variants ppo,ensemble_min

Runs `e2e_rlhf.py --tiny --seeds S --step 1 2` into OUT (skipping finished seeds), trains the extra reward
models the ensemble variants need (rm-2/, rm-3/ of each seed: stage 2 again on the same data slice,
`--data_split_seed N`, with seed 100 N + k), then stage 3 once per variant and seed through
`launch/tiny/single_gpu.sh` into OUT/seed-N/<variant>, each from that seed's sft/ and rm/, and prints the
multi-seed summary of pipeline/multiseed.py (mean, std, 95% bootstrap interval and worst seed of the gold
gain, best and malformed shares, KL and distinct-2) per variant, plus its markdown table
(OUT/defences.md). A finished variant of a seed is not run again.

Variants are the tiny script's PPO (`ppo`, the default: the lowest score of three reward models) with one
thing changed; each line of VARIANTS says what. Members rm-2, rm-3 are trained with the seeds of the launch
scripts' REWARD_MEMBERS (launch/lib.sh), so the default variant equals `e2e_rlhf.py --tiny --seeds N`'s ppo/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.multiseed import Method, collect, format_summary, markdown_table, seed_dir  # noqa: E402

# name -> (launch STEP, extra stage-3 flags, reward models: the launch scripts' REWARD_MEMBERS, so K > 1 scores
# with rm/ and rm-2 ... rm-K). The tiny default (launch/tiny/single_gpu.sh) is PPO at actor lr 7.5e-5 on the min
# of 3 reward models; every other variant changes the reward models, their aggregation or the step size.
LR_1_5 = ["--actor_learning_rate", "1.5e-4"]
VARIANTS: dict[str, tuple[str, list[str], int]] = {
    "ppo": ("3", [], 3),  # the tiny default
    "single_rm_lr1.5e-4": ("3", LR_1_5, 1),  # the default before the ensembles: one reward model, lr 1.5e-4
    "single_rm_lr7.5e-5": ("3", [], 1),  # one reward model, the default's step
    "single_rm_kl0.3_lr1.5e-4": ("3", [*LR_1_5, "--init_kl_coef", "0.3"], 1),  # a stronger KL penalty
    # a KL target: horizon 64 samples, so the coefficient moves by up to x1.05 per 16-sample iteration
    "single_rm_kl_target1_lr1.5e-4": (
        "3",
        [*LR_1_5, "--adaptive_kl", "--kl_target", "1", "--kl_horizon", "64"],
        1,
    ),
    "ens2_min_lr1.5e-4": (
        "3",
        LR_1_5,
        2,
    ),  # min of two = mean - std (the population std of two is half their gap)
    "ens3_mean_lr1.5e-4": ("3", [*LR_1_5, "--reward_ensemble_aggregation", "mean"], 3),
    "ens3_mean_minus_std_lr1.5e-4": ("3", [*LR_1_5, "--reward_ensemble_aggregation", "mean_minus_std"], 3),
    "ens3_min_lr1.5e-4": ("3", LR_1_5, 3),  # the default's ensemble at twice its step
}


def _env(seed: int, threads: int, reward_models: int) -> dict[str, str]:
    env = dict(os.environ, SEED=str(seed), PYTHONUNBUFFERED="1", REWARD_MEMBERS=str(reward_models))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def _launch(
    step: str, out: Path, flags: list[str], seed: int, threads: int, log: Path, reward_models: int = 1
) -> None:
    cmd = ["bash", "launch/tiny/single_gpu.sh", step, str(out), "--", *flags]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        status = subprocess.run(
            cmd, cwd=REPO, env=_env(seed, threads, reward_models), stdout=f, stderr=subprocess.STDOUT
        ).returncode
    if status:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}; log {log}")


def extra_reward_model(out: Path, seed: int, k: int, threads: int) -> None:
    """rm-k of a seed: stage 2 on the seed's data slice with another seed (init and data order), as the launch
    scripts' REWARD_MEMBERS trains it (launch/lib.sh)."""
    target = out / f"rm-{k}"
    if (target / "rm_metrics.json").is_file():
        return
    flags = ["--output_dir", str(target), "--seed", str(100 * seed + k), "--data_split_seed", str(seed),
             "--tensorboard_path", str(out / "tensorboard" / f"rm-{k}")]  # fmt: skip
    print(f"[seed {seed}] reward model rm-{k}", flush=True)
    _launch("2", out, flags, seed, threads, out / f"rm-{k}.log")


def run_variant(out: Path, seed: int, name: str, threads: int) -> None:
    step, flags, reward_models = VARIANTS[name]
    target = out / name
    if (target / "ppo_metrics.json").is_file():
        return
    for k in range(2, reward_models + 1):
        extra_reward_model(out, seed, k, threads)
    flags = [*flags, "--output_dir", str(target), "--tensorboard_path", str(out / "tensorboard" / name)]
    print(f"[seed {seed}] {name}", flush=True)
    _launch(step, out, flags, seed, threads, out / f"{name}.log", reward_models)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--seeds", default="1,2,3,4,5")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"Comma-separated subset of {', '.join(VARIANTS)}."
    )
    p.add_argument("--jobs", type=int, default=1, help="Seeds run at once (CPU threads shared among them).")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    root = args.output_dir.resolve()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    subprocess.run(
        [sys.executable, "e2e_rlhf.py", "--tiny", "--seeds", args.seeds, "--step", "1", "2", "--jobs",
         str(args.jobs), "--output-dir", str(root)],
        cwd=REPO, check=True,
    )  # fmt: skip

    def one_seed(seed: int) -> None:
        for name in variants:
            run_variant(seed_dir(root, seed), seed, name, threads)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one_seed, seeds))
    summary = collect(root, seeds, [Method(v, v, "ppo_metrics.json") for v in variants])
    print("\n" + format_summary(summary))
    table = markdown_table(summary)
    (root / "defences.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
