"""A learning result over seeds: per method, the mean, spread, worst seed and a bootstrap interval of what the
gold says, read from the metrics files of `e2e_rlhf.py --seeds` (OUT/seed-N/<method>/).

One seed's result is a draw: another CPU rounds differently from stage 1 on, and the same seed then follows
another trajectory. So a claim about a method is a claim about the spread of its draws, and the worst seed is
what a user may get. Per method (PPO, each critic-free estimator, DPO) and measure:

    gold gain            gold mean after - before (held-out answers, the bundled task's gold scorer)
    best share gain      share of answers the gold calls "best", after - before
    malformed after      share of answers the gold cannot parse (or that did not end), after
    malformed change     after - before
    final KL             mean per-sequence KL of the held-out answers to the stage-1 policy (n/a for ORPO and
                         SimPO: they load no reference to measure it against)
    distinct-2 ratio     distinct-2 of the answers after / before (below 0.5: the answers collapsed)

`worst` is the minimum of a measure where higher is better, the maximum otherwise; the 95% interval is a
percentile bootstrap of the mean over seeds (fixed resampling seed, so the same files give the same table).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.evaluation.metrics import AnswerEval, PolicyMetrics

SEED_DIR_PREFIX = "seed-"
SUMMARY_JSON = "multiseed_summary.json"
SUMMARY_MD = "multiseed_summary.md"
CURVES_PNG = "multiseed_gold_vs_kl.png"
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    higher_is_better: bool
    signed: bool  # printed with a sign (a change) or plain (a level)


MEASURES = (
    Measure("gold_gain", "gold gain", True, True),
    Measure("best_gain", "best share gain", True, True),
    Measure("malformed_after", "malformed after", False, False),
    Measure("malformed_change", "malformed change", False, True),
    Measure("final_kl", "final KL", False, False),
    Measure("distinct_2_ratio", "distinct-2 ratio", True, False),
)


@dataclass(frozen=True)
class Method:
    """A stage that ends a pipeline with a policy graded on held-out prompts: its directory and metrics file."""

    name: str  # directory under OUT/seed-N
    title: str
    metrics: str


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"{SEED_DIR_PREFIX}{seed}"


def seed_result(metrics: PolicyMetrics) -> dict[str, float] | None:
    """The measures of one run from its metrics (stage 3's ppo_metrics.json or DPO's dpo_metrics.json); None
    when it graded no gold."""
    before, after = metrics.before, metrics.after
    if before.gold_mean is None or after.gold_mean is None:
        return None

    def share(evaluation: AnswerEval, label: str) -> float:
        value = evaluation.share(label)
        return float("nan") if value is None else value

    result = {
        "gold_before": before.gold_mean,
        "gold_gain": after.gold_mean - before.gold_mean,
        "best_before": share(before, "best"),
        "best_gain": share(after, "best") - share(before, "best"),
        "malformed_before": share(before, "malformed"),
        "malformed_after": share(after, "malformed"),
        "final_kl": _kl(metrics),
        "distinct_2_ratio": after.distinct_2 / before.distinct_2 if before.distinct_2 else 1.0,
    }
    result["malformed_change"] = result["malformed_after"] - result["malformed_before"]
    return result


def _kl(metrics: PolicyMetrics) -> float:
    """The run's final KL to the stage-1 policy; NaN for a reference-free loss, which measures none."""
    kl = metrics.final_kl if metrics.final_kl is not None else metrics.after.kl
    return float("nan") if kl is None else float(kl)


def gold_vs_kl(metrics: PolicyMetrics) -> tuple[list[float], list[float]]:
    """The held-out evaluations of one run as (KL, gold mean) points, in step order."""
    points = [e for e in metrics.evals if e.gold_mean is not None and e.kl is not None]
    return [float(e.kl) for e in points], [float(e.gold_mean) for e in points]  # empty without a reference


def bootstrap_interval(values: Sequence[float], level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (BOOTSTRAP_RESAMPLES resamples, fixed seed)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 1:
        return float(x[0]), float(x[0])
    means = np.random.default_rng(seed).choice(x, size=(BOOTSTRAP_RESAMPLES, len(x))).mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def describe(values: Sequence[float], higher_is_better: bool) -> dict[str, float]:
    """mean, std (sample; 0 for one value), worst, and the 95% bootstrap interval (ci_low, ci_high); NaN
    where a seed lacks the measure."""
    x = np.asarray(values, dtype=float)
    low, high = bootstrap_interval(x)
    return {
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
        "worst": float(x.min() if higher_is_better else x.max()),
        "ci_low": low,
        "ci_high": high,
    }


def collect(out: Path, seeds: Sequence[int], methods: Sequence[Method]) -> dict[str, dict[str, Any]]:
    """Per method title with a finished run in at least one seed's directory: its seeds, their results and
    gold-vs-KL curves, and `describe` of every measure over those seeds."""
    summary: dict[str, dict[str, Any]] = {}
    for method in methods:
        runs = {}
        for seed in seeds:
            path = seed_dir(out, seed) / method.name / method.metrics
            if path.is_file():
                metrics = PolicyMetrics.read(path)
                if (result := seed_result(metrics)) is not None:
                    runs[seed] = (result, gold_vs_kl(metrics))
        if not runs:
            continue
        results = {seed: r for seed, (r, _) in runs.items()}
        summary[method.title] = {
            "seeds": sorted(results),
            "per_seed": results,
            "curves": {seed: c for seed, (_, c) in runs.items()},
            "stats": {
                m.key: describe([results[s][m.key] for s in sorted(results)], m.higher_is_better)
                for m in MEASURES
            },
            "gold_raised": sum(results[s]["gold_gain"] > 0 for s in results),
        }
    return summary


def _num(value: float, signed: bool, digits: int = 3) -> str:
    if value != value:  # NaN: not measured (the KL of a reference-free loss)
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def format_summary(summary: dict[str, dict[str, Any]]) -> str:
    """The console report: per method, every measure's mean, std, 95% interval, worst seed and per-seed values."""
    lines = []
    for title, s in summary.items():
        seeds = s["seeds"]
        lines.append(
            f"== {title}: {len(seeds)} seeds ({', '.join(map(str, seeds))}), gold raised on "
            f"{s['gold_raised']} of {len(seeds)}; gold before {statistics.fmean(s['per_seed'][x]['gold_before'] for x in seeds):+.3f}, "
            f"best before {statistics.fmean(s['per_seed'][x]['best_before'] for x in seeds):.2f}, "
            f"malformed before {statistics.fmean(s['per_seed'][x]['malformed_before'] for x in seeds):.2f} (means)"
        )
        lines.append(
            f"   {'measure':<18} {'mean':>7} {'std':>6}  {'95% interval':<17} {'worst':>7}   per seed"
        )
        for m in MEASURES:
            st = s["stats"][m.key]
            interval = f"[{_num(st['ci_low'], m.signed)}, {_num(st['ci_high'], m.signed)}]"
            per_seed = " ".join(_num(s["per_seed"][x][m.key], m.signed, 2) for x in seeds)
            lines.append(
                f"   {m.label:<18} {_num(st['mean'], m.signed):>7} {st['std']:6.3f}  {interval:<17} "
                f"{_num(st['worst'], m.signed):>7}   {per_seed}"
            )
    return "\n".join(lines)


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    """One row per method: every measure as 'mean (worst seed)', and the seeds whose gold rose."""
    head = ["method", "seeds", *(f"{m.label}: mean (worst)" for m in MEASURES), "gold raised"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for title, s in summary.items():
        cells = [title, str(len(s["seeds"]))]
        for m in MEASURES:
            st = s["stats"][m.key]
            digits = 2 if m.key in ("final_kl", "distinct_2_ratio") else 3
            cells.append(f"{_num(st['mean'], m.signed, digits)} ({_num(st['worst'], m.signed, digits)})")
        cells.append(f"{s['gold_raised']}/{len(s['seeds'])}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_gold_vs_kl(summary: dict[str, dict[str, Any]], path: Path) -> Path:
    """One panel per method: every seed's held-out gold against its KL to the stage-1 policy, the evaluations
    in step order (the first point is the stage-1 policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(summary)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, s) in zip(axes.flat, summary.items(), strict=False):
        for seed in s["seeds"]:
            kl, gold = s["curves"][seed]
            ax.plot(kl, gold, marker="o", markersize=3, label=f"seed {seed}")
        ax.set_title(title)
        if not any(s["curves"][seed][0] for seed in s["seeds"]):
            ax.text(0.5, 0.5, "no reference: KL not measured", ha="center", transform=ax.transAxes)
        ax.set_xlabel("held-out KL to the stage-1 policy")
        ax.set_ylabel("held-out gold")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_summary(out: Path, summary: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """multiseed_summary.json (everything, per seed included), multiseed_summary.md (the table) and the PNG,
    under `out`."""
    paths = {"json": out / SUMMARY_JSON, "table": out / SUMMARY_MD, "png": out / CURVES_PNG}
    serialisable = {
        title: {**s, "per_seed": {str(k): v for k, v in s["per_seed"].items()},
                "curves": {str(k): v for k, v in s["curves"].items()}}
        for title, s in summary.items()
    }  # fmt: skip
    paths["json"].write_text(json.dumps(serialisable, indent=2) + "\n")
    paths["table"].write_text(markdown_table(summary) + "\n")
    plot_gold_vs_kl(summary, paths["png"])
    return paths
