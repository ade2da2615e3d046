"""The whole pipeline in one command: SFT -> reward model -> PPO (or SFT -> DPO), then a summary table and a plot.

    python e2e_rlhf.py --tiny                      # the built-in tiny default (CPU, or one GPU when present)
    python e2e_rlhf.py --tiny --algo dpo           # SFT -> DPO on the same data (reuses a finished sft/)
    python e2e_rlhf.py --tiny --algo kto,orpo,simpo   # the other preference losses, each in its own directory
    python e2e_rlhf.py --tiny --algo grpo          # GRPO in place of PPO (reuses finished sft/ and rm/)
    python e2e_rlhf.py --actor-model smollm2-135m-instruct --deployment-type cpu   # a real model, 2 CPU cores
    python e2e_rlhf.py --actor-model facebook/opt-1.3b --reward-model facebook/opt-350m \\
        --deployment-type single_gpu --output-dir out/opt-1.3b
    python e2e_rlhf.py --actor-model meta-llama/Llama-2-7b-hf --deployment-type multi_node --step 3
    python e2e_rlhf.py ... --dry-run               # print each stage's final command, run nothing
    python e2e_rlhf.py --tiny --seeds 1,2,3 --algo ppo,grpo,dpo --jobs 2   # over seeds: OUT/seed-N/<algo>/,
                                                   # then mean, std, worst seed and 95% interval per method

Like DeepSpeed-Chat's e2e_rlhf.py, every stage runs through a launch script,
`launch/<family>/<size>/<deployment>.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]]`, which holds the
settings for that model size and hardware (see launch/lib.sh). Output layout under --output-dir:

    sft/       stage-1 model (Hugging Face format), sft_metrics.json, training.log, stage_run.json
    rm/        stage-2 reward model, rm_metrics.json, training.log, stage_run.json
    ppo/       actor/, critic/ (and actor_ema/), ppo_metrics.json, heldout_answers.jsonl, ppo_curves.png,
               training.log, stage_run.json
    grpo/, rloo/, ...   (--algo grpo, ...) the same as ppo/ without critic/
    dpo/       (--algo dpo) the DPO policy (Hugging Face format), dpo_metrics.json, heldout_answers.jsonl,
               training.log, stage_run.json
    kto/, orpo/, simpo/   (--algo kto, ...) the same as dpo/ for that preference loss
    rm-2/, rm-3/   further reward models of an ensemble (REWARD_MEMBERS of the launch scripts; the tiny default's)
    tensorboard/{sft,rm,ppo}/   TensorBoard event files        data_cache/   tokenised data
With --seeds, each seed's outputs are this layout under OUT/seed-N/, and OUT holds the multi-seed summary
(pipeline/multiseed.py: multiseed_summary.md, .json, multiseed_gold_vs_kl.png).

A stage is finished when its metrics file exists: the stage scripts write it last, after the model is saved,
so an interrupted or failed stage never counts as finished. A finished stage is skipped (--force reruns it);
a stage that runs makes the later selected stages run too, since their input changed. Before a stage runs,
its old metrics file and stage_run.json are removed. stage_run.json records the command and its wall time,
which the summary shows even when the stage was skipped in this invocation.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.plan import PlannedStage, is_finished, plan_stages, stale_after
from pipeline.report import duration, report
from pipeline.run import (
    Runner,
    StageRun,
    failure_help,
    run_subprocess,
    stage_command,
    stage_env,
    write_run_record,
)
from pipeline.stages import (
    DEPLOYMENTS,
    PIPELINES,
    PREFERENCE,
    PREFERENCE_STAGES,
    REPO,
    RL_STAGES,
    RUN_MARKER,
    RUN_RECORD,
    STAGE_LOG,
    STAGES,
    ModelSpec,
    Stage,
    launch_script,
    resolve_actor,
    resolve_reward,
)

# ---------------------------------------------------------------------------------------------- main


def _algo_list(text: str) -> list[str]:
    algos = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in algos if a not in PIPELINES]
    if unknown or not algos:
        raise argparse.ArgumentTypeError(f"{unknown or text!r}: choose from {', '.join(sorted(PIPELINES))}")
    return list(dict.fromkeys(algos))


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: seeds are comma-separated integers, e.g. 1,2,3"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct seeds, e.g. 1,2,3")
    return seeds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run SFT -> reward model -> PPO through the launch scripts; skip finished stages."
    )
    parser.add_argument(
        "--tiny", action="store_true", help="The built-in tiny default (= --actor-model tiny)."
    )
    parser.add_argument(
        "--actor-model",
        default="tiny",
        help="Actor (stage 1) model: a hub id of a model with launch scripts, e.g. facebook/opt-1.3b, "
        "meta-llama/Llama-2-7b-hf, Qwen/Qwen2.5-7B (also 'opt-1.3b', '1.3b' for OPT, 'opt/1.3b'), or 'tiny' (the default).",
    )
    parser.add_argument(
        "--reward-model",
        default=None,
        help="Reward model (stage 2) base: default the family's (facebook/opt-350m for OPT, Llama-2-7b for "
        "Llama-2, Qwen2.5-0.5B for Qwen2.5). Must share the actor's tokenizer.",
    )
    parser.add_argument(
        "--deployment-type",
        choices=DEPLOYMENTS,
        default="single_gpu",
        help="Which launch script (single_gpu).",
    )
    parser.add_argument(
        "--algo",
        type=_algo_list,
        default=["ppo"],
        help="ppo: SFT -> reward model -> PPO (steps 1 2 3); grpo, dr_grpo, rloo, reinforce_pp, "
        "reinforce_pp_baseline, dapo, gspo: the same, with that critic-free estimator as step 3 (in <algo>/); "
        "dpo, kto, orpo, simpo: SFT -> that preference loss on the same pairs (steps 1 2: step 2 is DPO, KTO, "
        "ORPO or SimPO, in <algo>/). A comma-separated list runs each in turn. "
        "All write under one --output-dir, so they share finished stages.",
    )
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        metavar="N,N,...",
        help="Run the pipelines once per seed, into OUTPUT/seed-N, every stage with --seed N (the tiny model's "
        "init too), then print per method the mean, std, worst seed and 95%% bootstrap interval of the gold's "
        "figures (OUTPUT/multiseed_summary.md, .json, multiseed_gold_vs_kl.png).",
    )
    parser.add_argument(
        "--reward-members",
        type=int,
        default=None,
        metavar="K",
        help="Reward models step 2 trains (REWARD_MEMBERS of the launch scripts): K > 1 adds rm-2 ... rm-K "
        "(other seeds, same data) and PPO and the critic-free steps score with their ensemble. Default: the "
        "launch script's.",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="With --seeds: seeds run at once, the CPU threads shared among them (1).",
    )
    parser.add_argument(
        "--step", type=int, nargs="+", choices=(1, 2, 3), default=None, help="Steps to run (all)."
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="Output root (default: output/<actor model name>)."
    )
    zero = ("", "0", "1", "2", "3")
    parser.add_argument(
        "--actor-zero-stage",
        default="",
        choices=zero,
        help="ZeRO stage of steps 1 and 3 (actor); '' = script's.",
    )
    parser.add_argument(
        "--reward-zero-stage", default="", choices=zero, help="ZeRO stage of step 2 and the step-3 critic."
    )
    parser.add_argument("--force", action="store_true", help="Rerun selected steps even when finished.")
    parser.add_argument(
        "--dry-run", action="store_true", help="Print each stage's final command; run nothing."
    )
    parser.add_argument("--verbose", action="store_true", help="Echo every line of the stages' output.")
    for step in (1, 2, 3):
        parser.add_argument(
            f"--step{step}-args",
            default="",
            metavar="FLAGS",
            help=f"Extra flags for step {step}, appended to the script's (write --step{step}-args='--flag v').",
        )
    parser.add_argument(
        "--dpo-args",
        default="",
        metavar="FLAGS",
        help="Extra flags for the preference step (--algo dpo, kto, orpo, simpo).",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.reward_members is not None and args.reward_members < 1:
        parser.error(f"--reward-members must be >= 1, got {args.reward_members}")
    if args.tiny:
        args.actor_model = "tiny"
    return args


def algo_flag(stage: Stage) -> str:
    """The --algo that reruns `stage` ('' for the default pipeline's stages)."""
    return (
        ""
        if stage in STAGES.values()
        else f"--algo {next(a for a, p in PIPELINES.items() if stage in p.values())} "
    )


@dataclass
class Invocation:
    """What every pipeline of one e2e_rlhf.py call shares: the parsed flags, the models, the launch script and
    the runner."""

    args: argparse.Namespace
    actor: ModelSpec
    reward_model: str
    script: Path
    runner: Runner


def run_pipeline(
    inv: Invocation, algo: str, out: Path, env: dict[str, str], ran: set[str], prefix: str = ""
) -> int:
    """Plan and run one --algo's stages under `out`; a stage already run in this invocation (named in `ran`,
    which gets the stages that run) is not run again, --force or not. Returns the exit status."""
    args = inv.args
    stages = PIPELINES[algo]
    steps = sorted(stages) if args.step is None else args.step  # --step 3 with --algo ppo,dpo: DPO has no 3
    if len(args.algo) > 1 and args.step is not None:
        steps = [s for s in steps if s in stages]
    try:
        plan = plan_stages(out, steps, args.force, stages)
    except ValueError as e:
        if not args.dry_run or not set(steps) <= set(stages):
            raise SystemExit(f"e2e_rlhf: {prefix}{e}") from None
        print(f"{prefix}note: {e}")
        plan = [PlannedStage(stages[s], True, "dry run") for s in sorted(set(steps))]
    plan = [
        PlannedStage(p.stage, False, "ran in this invocation") if p.stage.name in ran else p for p in plan
    ]
    for planned in plan:
        stage = planned.stage
        header = f"{prefix}== step {stage.step}: {stage.title}"
        if not planned.run:
            print(f"{header}: skipped, {planned.reason}")
            continue
        preference = stage.name in PREFERENCE
        trains_policy = stage.step in (1, 3) or preference
        zero = args.actor_zero_stage if trains_policy else args.reward_zero_stage
        extra = shlex.split(args.dpo_args if preference else getattr(args, f"step{stage.step}_args"))
        if (stage.dir(out) / RUN_MARKER).is_file():  # a rerun replaces the stage's earlier model on purpose
            extra.append("--overwrite_output_dir")
        command = stage_command(
            inv.script, stage.launch_arg, out, zero, args.reward_zero_stage, args.dry_run, extra
        )
        print(f"{header} ({planned.reason})\n{prefix}   {shlex.join(command)}", flush=True)
        run = StageRun(
            stage.step,
            command,
            env,
            stage.dir(out) / STAGE_LOG,
            verbose=args.verbose or args.dry_run,
            prefix=prefix,
        )
        if not args.dry_run:
            stage.metrics_path(out).unlink(missing_ok=True)  # an interrupted rerun must not look finished
            (stage.dir(out) / RUN_RECORD).unlink(missing_ok=True)
        t0 = time.perf_counter()
        status = inv.runner(run)
        seconds = time.perf_counter() - t0
        if status != 0:
            print(failure_help(stage, run, status), file=sys.stderr)
            return status
        if args.dry_run:
            ran.add(stage.name)
            continue
        if not is_finished(stage, out):
            print(
                f"{prefix}step {stage.step} exited 0 but wrote no {stage.metrics_path(out)}; log: {run.log_path}"
            )
            return 1
        write_run_record(stage, out, command, seconds)
        ran.add(stage.name)
        print(f"{header}: done in {duration(seconds)}", flush=True)
    if not args.dry_run:
        for stage in stale_after(out, plan, stages):
            if stage.name not in ran:
                print(
                    f"{prefix}note: {stage.dir(out)} was made from the previous outputs of earlier steps; "
                    f"rerun it with {algo_flag(stage)}--step {stage.step} --force"
                )
    return 0


def run_algos(inv: Invocation, out: Path, env: dict[str, str], prefix: str = "") -> tuple[int, set[str]]:
    """Every --algo in turn under `out` (they share finished stages); (exit status, the stages that ran)."""
    ran: set[str] = set()
    for algo in inv.args.algo:
        status = run_pipeline(inv, algo, out, env, ran, prefix)
        if status:
            return status, ran
    return 0, ran


def seed_env(env: dict[str, str], seed: int, jobs: int) -> dict[str, str]:
    """A seed's environment: SEED for the launch scripts (every stage's --seed, the tiny model's init) and,
    with several seeds at once, the CPU threads shared out among them (unless OMP_NUM_THREADS is set)."""
    env = {**env, "SEED": str(seed)}
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_seeds(inv: Invocation, out: Path, env: dict[str, str]) -> int:
    """`--seeds`: the selected pipelines once per seed, into OUT/seed-N (--jobs seeds at a time), then the
    multi-seed summary of every method finished under those seed directories."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.multiseed import format_summary, seed_dir

    args = inv.args

    def one(seed: int) -> int:
        status, _ = run_algos(inv, seed_dir(out, seed), seed_env(env, seed, args.jobs), f"[seed {seed}] ")
        return status

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        statuses = dict(zip(args.seeds, pool.map(one, args.seeds), strict=True))
    failed = [seed for seed, status in statuses.items() if status]
    if args.dry_run:
        return max(statuses.values())
    summary, paths = multiseed_report(out, args.seeds)
    if summary:
        print("\n" + format_summary(summary))
        print(
            f"table:         {paths['table']}\nper seed:      {paths['json']}\ngold vs KL:    {paths['png']}"
        )
    print(f"one seed's table and outputs: python e2e_rlhf.py --output-dir {seed_dir(out, args.seeds[0])} ...")
    if failed:
        print(f"e2e_rlhf: seeds {failed} failed; their logs are under {out}/seed-N/<stage>/{STAGE_LOG}")
        return 1
    return 0


def multiseed_report(out: Path, seeds: Sequence[int]) -> tuple[dict, dict[str, Path]]:
    """The multi-seed summary of every policy-training stage (PPO, the critic-free estimators, DPO) finished
    under OUT/seed-N for `seeds`, and the files it was written to under `out`."""
    from pipeline.multiseed import Method, collect, write_summary

    methods = [Method(s.name, s.title, s.metrics) for s in (*RL_STAGES, *PREFERENCE_STAGES)]
    summary = collect(out, seeds, methods)
    return summary, (write_summary(out, summary) if summary else {})


def main(argv: Sequence[str] | None = None, runner: Runner = run_subprocess) -> int:
    args = parse_args(argv)
    actor = resolve_actor(args.actor_model)
    reward_model = resolve_reward(args.reward_model, actor)
    inv = Invocation(args, actor, reward_model, launch_script(actor, args.deployment_type), runner)
    out = (args.output_dir or REPO / "output" / actor.hub_id.split("/")[-1]).resolve()
    kinds = ", ".join(
        [f"reward model {reward_model}"] * any(a not in PREFERENCE for a in args.algo)
        + [PREFERENCE[a] for a in args.algo if a in PREFERENCE]
    )
    seeds = f", seeds {','.join(map(str, args.seeds))}" if args.seeds else ""
    print(f"pipeline: actor {actor.hub_id}, {kinds}, {args.deployment_type}, output {out}{seeds}")
    env = stage_env(actor, reward_model)
    if args.reward_members is not None:
        env["REWARD_MEMBERS"] = str(args.reward_members)
    started = time.perf_counter()
    if args.seeds:
        status = run_seeds(inv, out, env)
    else:
        status, ran = run_algos(inv, out, env)
        if status == 0 and not args.dry_run:
            report(out, ran)
    if status == 0 and not args.dry_run:
        print(f"this invocation: {duration(time.perf_counter() - started)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
