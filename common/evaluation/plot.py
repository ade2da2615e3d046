"""A PNG of the PPO curves, drawn from the `ppo_metrics.json` that stage 3 writes.

    python -m common.evaluation.plot OUT/ppo/ppo_metrics.json [OUT/ppo/ppo_curves.png]

Three panels over PPO iterations: the reward-model score (mean normalised score of each iteration's
rollouts, plus the held-out evaluations as markers), the KL to the reference policy (batch mean of the
per-sequence sum, the quantity the KL controller sees) and the response length in tokens (rollouts and
held-out). When the held-out evaluations record their KL (stage 3 does since 2026-12-02), a fourth panel
draws the over-optimisation curve: the held-out proxy (reward-model) score and, where a gold reward is known,
the gold score against that KL; a proxy that keeps rising while the gold falls is reward hacking.
matplotlib runs with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.evaluation.metrics import MetricsFileError, PolicyMetrics

PNG_NAME = "ppo_curves.png"
# (panel title, history key, eval key or None, y label)
PANELS = (
    ("reward-model score (normalised)", "score_mean", "score", "score"),
    ("KL to the reference policy", "kl", None, "per-sequence KL"),
    ("response length", "response_length", "response_length", "tokens"),
)


def load_metrics(path: str | Path) -> PolicyMetrics:
    """Read a ppo_metrics.json; ValueError (MetricsFileError) naming the file when it is not one."""
    metrics = PolicyMetrics.read(path)
    if not isinstance(metrics.history, list):
        raise MetricsFileError(f"{path}: no 'history' list; is this a ppo_metrics.json written by stage 3?")
    return metrics


def curve_series(metrics: PolicyMetrics) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """Per panel key, the plotted points: {"train": (steps, values), "eval": (steps, values)}.

    "train" has one point per PPO iteration from `history`; "eval" one per held-out evaluation from
    `evals` (step 0 is the stage-1 policy), for the panels that have an eval quantity."""
    history, evals = metrics.history or [], metrics.evals
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for _, key, eval_key, _ in PANELS:
        rows = [h for h in history if key in h]
        panel = {"train": ([float(h["step"]) for h in rows], [float(h[key]) for h in rows])}
        if eval_key is not None:
            points = [e for e in evals if getattr(e, eval_key) is not None]
            panel["eval"] = ([float(e.step) for e in points], [float(getattr(e, eval_key)) for e in points])
        series[key] = panel
    return series


def overoptimisation_series(metrics: PolicyMetrics) -> dict[str, tuple[list[float], list[float]]]:
    """The held-out evaluations as (KL, value) points: {"score": proxy, "gold_mean": gold}; a key is absent
    when no evaluation records it (the result is empty when none records its KL)."""
    evals = [e for e in metrics.evals if e.kl is not None]
    series = {}
    for key in ("score", "gold_mean"):
        points = [e for e in evals if getattr(e, key) is not None]
        if points:
            series[key] = ([float(e.kl) for e in points], [float(getattr(e, key)) for e in points])
    return series


def _draw_overoptimisation(ax, series: dict[str, tuple[list[float], list[float]]]) -> None:
    """Proxy score (left axis, red) and gold score (right axis, green) against the held-out KL."""
    ax.plot(*series["score"], color="tab:red", marker="D", markersize=7, linestyle="--", label="proxy (RM)")
    ax.set_xlabel("held-out KL to the reference (per sequence)")
    ax.set_ylabel("proxy score (normalised)", color="tab:red")
    ax.set_title("over-optimisation: proxy and gold against KL")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    if "gold_mean" in series:
        gold_ax = ax.twinx()
        gold_ax.plot(*series["gold_mean"], color="tab:green", marker="s", markersize=7, label="gold")
        gold_ax.set_ylabel("gold score", color="tab:green")
        more = gold_ax.get_legend_handles_labels()
        handles = (handles[0] + more[0], handles[1] + more[1])
    ax.legend(*handles, loc="best", fontsize=8)


def plot_ppo_curves(metrics: PolicyMetrics | str | Path, out_png: str | Path) -> Path:
    """Draw the PPO panels of `metrics` (or of a ppo_metrics.json path) into `out_png`: the three curves
    over iterations, and the over-optimisation panel when the evaluations record their KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(metrics, PolicyMetrics):
        metrics = load_metrics(metrics)
    series = curve_series(metrics)
    over = overoptimisation_series(metrics)
    panels = len(PANELS) + ("score" in over)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    for ax, (title, key, _, ylabel) in zip(axes, PANELS, strict=False):
        steps, values = series[key]["train"]
        ax.plot(steps, values, color="tab:blue", marker="o", markersize=3, linewidth=1.5, label="rollouts")
        if "eval" in series[key]:
            e_steps, e_values = series[key]["eval"]
            ax.plot(
                e_steps, e_values, color="tab:red", marker="D", markersize=7, linestyle="--", label="held-out"
            )
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if "score" in over:
        _draw_overoptimisation(axes[-1], over)
    if metrics.score_gain is not None:
        estimator = (metrics.algorithm or {}).get("advantage_estimator", "gae")
        before, after = metrics.before, metrics.after
        fig.suptitle(
            f"{'PPO' if estimator == 'gae' else estimator}: held-out score {before.score:+.3f} -> "
            f"{after.score:+.3f} (gain {metrics.score_gain:+.3f}), final KL {metrics.final_kl:.3f}"
            + (
                f"; gold {before.gold_mean:+.3f} -> {after.gold_mean:+.3f}"
                if metrics.gold_gain is not None
                else ""
            )
        )
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot PPO curves from ppo_metrics.json")
    parser.add_argument("metrics", type=Path, help="ppo_metrics.json written by stage 3")
    parser.add_argument("png", type=Path, nargs="?", help=f"output PNG (default: {PNG_NAME} beside it)")
    args = parser.parse_args(argv)
    try:
        png = plot_ppo_curves(args.metrics, args.png or args.metrics.with_name(PNG_NAME))
    except (OSError, ValueError) as e:
        raise SystemExit(f"plot: {e}") from None
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
