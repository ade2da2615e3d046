"""The preference losses (DPO, KTO, ORPO, SimPO) next to PPO on the bundled task, from one stage-1 model, in
one run of this script.

    python bench/dpo_vs_ppo.py --output-dir out/dpo_vs_ppo          # ~25 min on 2 CPU cores

Runs the README's main command, `e2e_rlhf.py --tiny --output-dir OUT` (SFT -> reward model -> PPO), then
`e2e_rlhf.py --tiny --algo dpo,kto,orpo,simpo --output-dir OUT`, which skips the finished stage 1 and trains
each loss from the same stage-1 model on the same pairs as the reward model (`--algo dpo` alone with
--preference dpo). Every policy is evaluated on the same held-out prompts with the same sampling (stage 3's),
so their "before" rows are one and the same policy. Prints one table (held-out gold mean, best and malformed
shares, KL of the answers to the stage-1 policy (n/a for ORPO and SimPO, which have no reference), wall time
of what each method adds to stage 1: reward model + PPO, or the preference stage) and appends one JSON line
per method to bench/results.jsonl. Pass --extra-dpo-args / --extra-ppo-args to try other settings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_ppo import environment  # noqa: E402
from common.evaluation.metrics import AnswerEval, PolicyMetrics  # noqa: E402
from pipeline.stages import PREFERENCE, PREFERENCE_STAGES  # noqa: E402


def run_e2e(out: Path, *flags: str) -> None:
    cmd = [sys.executable, "e2e_rlhf.py", "--tiny", "--output-dir", str(out), *flags]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def seconds(out: Path, stage_dir: str) -> float:
    return json.loads((out / stage_dir / "stage_run.json").read_text())["seconds"]


def figures(e: AnswerEval) -> dict:
    """The gold figures of one held-out evaluation (ppo_metrics.json / dpo_metrics.json "before", "after")."""
    return {"gold_mean": e.gold_mean, "best": e.share("best"), "malformed": e.share("malformed"), "kl": e.kl}


def method_rows(out: Path) -> list[dict]:
    """One dict per method (and one for the stage-1 policy they all start from) from the stages' metrics: PPO
    and each preference stage that finished under `out`."""
    ppo = PolicyMetrics.read(out / "ppo" / "ppo_metrics.json")
    rows = [
        {"method": "stage-1 policy (SFT)", **figures(ppo.before), "seconds": seconds(out, "sft")},
        {
            "method": "PPO (reward model + PPO)",
            **figures(ppo.after),
            "seconds": seconds(out, "rm") + seconds(out, "ppo"),
        },
    ]
    for stage in PREFERENCE_STAGES:
        if stage.metrics_path(out).is_file():
            metrics = PolicyMetrics.read(stage.metrics_path(out))
            rows.append(
                {"method": stage.title, **figures(metrics.after), "seconds": seconds(out, stage.name)}
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| policy | gold mean | best share | malformed share | KL to stage 1 (per sequence) | wall time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['gold_mean']:+.3f} | {r['best']:.2f} | {r['malformed']:.2f} | "
            f"{'n/a' if r['kl'] is None else format(r['kl'], '.2f')} | {r['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--extra-ppo-args", default="", help="--step3-args for the PPO run")
    p.add_argument("--extra-dpo-args", default="", help="--dpo-args for the DPO run")
    p.add_argument(
        "--preference",
        default=",".join(PREFERENCE),
        help="The preference losses to run (e2e_rlhf.py --algo names), comma-separated.",
    )
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results.jsonl")
    args = p.parse_args()
    out = args.output_dir.resolve()
    run_e2e(out, *([f"--step3-args={args.extra_ppo_args}"] if args.extra_ppo_args else []))
    dpo_args = [f"--dpo-args={args.extra_dpo_args}"] if args.extra_dpo_args else []
    run_e2e(out, "--algo", args.preference, *dpo_args)
    rows = method_rows(out)
    before = PolicyMetrics.read(out / "ppo" / "ppo_metrics.json").before
    for name in args.preference.split(","):
        other = PolicyMetrics.read(out / name / "dpo_metrics.json").before
        if abs(before.gold_mean - other.gold_mean) > 1e-9:
            print(f"note: the stage-1 evaluations of ppo/ and {name}/ differ: their sampling is not the same")
    print("\n" + table(rows))
    env = environment()
    with args.results.open("a") as f:
        for r in rows[1:]:
            f.write(
                json.dumps({"bench": "dpo_vs_ppo", "model": "tiny", **r, "before": rows[0], **env}) + "\n"
            )
    print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
