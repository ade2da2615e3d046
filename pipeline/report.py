"""The summary table printed after a pipeline: each stage's figures, the proxy-vs-gold verdict that reads
the answers, the reward-hacking measures, wall times, and where the outputs are."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.evaluation.metrics import (
    AnswerEval,
    MetricsFileError,
    PolicyMetrics,
    RewardModelMetrics,
    SFTMetrics,
)
from pipeline.stages import (
    ALL_STAGES,
    PREFERENCE,
    PREFERENCE_STAGES,
    RL_STAGES,
    RUN_RECORD,
    STAGE_LOG,
    STAGES,
)


def _read(schema: Any, path: Path) -> Any:
    """`schema.read(path)`, None when the file is absent; a file that is not one stops with its message."""
    if not path.is_file():
        return None
    try:
        return schema.read(path)
    except MetricsFileError as e:
        raise SystemExit(str(e)) from None


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not valid JSON ({e})") from None


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{int(round(seconds))} s ({m}:{s:02d})"


def summary_rows(out: Path, ran: set[str] | None = None) -> list[tuple[str, str]]:
    """(label, value) rows from the stages' metrics files and run records under `out` (every pipeline's that
    ran there); `ran` names the stage directories ("sft", "rm", "ppo", "grpo", "dpo", ...) that ran in this
    invocation (the others' wall time is from an earlier run)."""
    sft = _read(SFTMetrics, STAGES[1].metrics_path(out))
    rm = _read(RewardModelMetrics, STAGES[2].metrics_path(out))
    rows: list[tuple[str, str]] = []
    if sft:
        ppl = sft.perplexity_per_epoch
        rows.append(("stage 1: held-out perplexity before -> after", f"{ppl[0]:.2f} -> {ppl[-1]:.2f}"))
    if rm:
        rows.append(
            ("stage 2: held-out pairwise accuracy", f"{rm.final.accuracy:.3f} ({rm.final.pairs} pairs)")
        )
    for stage in RL_STAGES:
        if metrics := _read(PolicyMetrics, stage.metrics_path(out)):
            rows += rl_rows("stage 3" if stage.name == "ppo" else stage.title, stage.title, metrics)
    for stage in PREFERENCE_STAGES:
        if metrics := _read(PolicyMetrics, stage.metrics_path(out)):
            rows += dpo_rows(metrics, stage.title)
    total = 0.0
    for stage in ALL_STAGES:
        record = _load(stage.dir(out) / RUN_RECORD)
        if record:
            total += record["seconds"]
            when = "" if ran is None or stage.name in ran else "  (earlier run)"
            label = f"wall time: step {stage.step} ({stage.title})"
            if stage.name in PREFERENCE:
                label = f"wall time: {stage.title}"
            rows.append((label, duration(record["seconds"]) + when))
    if total:
        rows.append(("wall time: all stages", duration(total)))
    return rows


def rl_rows(prefix: str, title: str, m: PolicyMetrics) -> list[tuple[str, str]]:
    """Stage 3's rows (PPO, or a critic-free estimator titled `title`): the held-out score of its reward (the
    reward model's, or --reward_fn's) before -> after, the final KL, then `gold_rows`."""
    before, after = m.before.score, m.after.score
    reward = "RM score" if (m.algorithm or {}).get("reward_fn") is None else "reward"
    rows = [
        (f"{prefix}: held-out {reward}, stage-1 policy", f"{before:+.3f}"),
        (f"{prefix}: held-out {reward}, {title} policy", f"{after:+.3f}"),
        (
            f"{prefix}: {title} policy scores higher",
            f"{'yes' if after > before else 'NO'} ({m.score_gain:+.3f} normalised units)",
        ),
        (f"{prefix}: final KL to the reference (per sequence)", f"{m.final_kl:.3f}"),
    ]
    return rows + gold_rows(m, prefix)


# (AnswerEval field, row label) of the reward-hacking measures, shown before -> after
MEASURE_ROWS = (
    ("eos_fraction", "share of answers ending in EOS"),
    ("response_length", "mean answer length (tokens)"),
    ("repeated_3gram_rate", "repeated 3-gram rate"),
    ("distinct_2", "distinct-2"),
    ("leaked_turn_markers", "share with leaked turn markers"),
)


# distinct-2 after / before below this: the answers collapsed onto a few texts, whatever the means say
COLLAPSE_RATIO = 0.5


# A rise of the malformed share by more than this (a share of the held-out answers) is a failure, whatever the
# means say: 0.02 is about 3 of the 128 held-out prompts of the tiny default, the noise of one evaluation.
MALFORMED_RISE_TOLERANCE = 0.02


def answer_failures(before: AnswerEval, after: AnswerEval) -> list[str]:
    """What the held-out answers themselves say against a gain, whatever the mean gold: the best share fell,
    the malformed share rose by more than MALFORMED_RISE_TOLERANCE, or the answers collapsed (distinct-2 below
    COLLAPSE_RATIO of before). Empty when none, or when the figures are not recorded."""
    failures = []
    best, best_after = before.share("best"), after.share("best")
    if best is not None and best_after is not None and best_after < best:
        failures.append(f"the best share fell ({best:.2f} -> {best_after:.2f})")
    bad, bad_after = before.share("malformed"), after.share("malformed")
    if bad is not None and bad_after is not None and bad_after > bad + MALFORMED_RISE_TOLERANCE + 1e-9:
        failures.append(f"the malformed share rose ({bad:.2f} -> {bad_after:.2f})")
    d2, d2_after = before.distinct_2, after.distinct_2
    if d2 and d2_after is not None and d2_after < COLLAPSE_RATIO * d2:
        failures.append(f"the answers collapsed (distinct-2 {d2:.3f} -> {d2_after:.3f})")
    return failures


def proxy_gold_verdict(
    proxy_gain: float, gold_gain: float, before: AnswerEval | None = None, after: AnswerEval | None = None
) -> str:
    """In words, what the held-out proxy (reward-model) and gold scores did from before to after training;
    with the evaluations `before` and `after`, a gold gain whose answers say otherwise (`answer_failures`) is
    no gain."""
    gains = f"proxy {proxy_gain:+.3f}, gold {gold_gain:+.3f}"
    failures = answer_failures(before, after) if before is not None and after is not None else []
    if proxy_gain > 0 and gold_gain <= 0:
        return f"REWARD HACKING: the proxy rose but the gold did not ({gains})"
    if gold_gain > 0 and failures:
        return f"NOT a real gain: the gold mean rose, but {'; '.join(failures)} ({gains})"
    if proxy_gain > 0:
        return f"both rose: a real gain ({gains})"
    if gold_gain > 0:
        return f"the gold rose though the proxy did not ({gains})"
    return f"neither rose ({gains})"


def label_share_rows(prefix: str, before: AnswerEval, after: AnswerEval) -> list[tuple[str, str]]:
    """The best and malformed shares of the gold's labels, before -> after (where the gold gave them)."""
    rows = []
    for label in ("best", "malformed"):
        share, share_after = before.share(label), after.share(label)
        if share is not None and share_after is not None:
            rows.append((f"{prefix}: held-out {label} share", f"{share:.2f} -> {share_after:.2f}"))
    return rows


def measure_rows(prefix: str, before: AnswerEval, after: AnswerEval) -> list[tuple[str, str]]:
    """The reward-hacking measures of the held-out answers, before -> after, and a warning when their
    diversity (distinct-2) fell below COLLAPSE_RATIO of what it was."""
    rows = [
        (f"{prefix}: {label}", f"{getattr(before, key):.3f} -> {getattr(after, key):.3f}")
        for key, label in MEASURE_ROWS
        if getattr(before, key) is not None and getattr(after, key) is not None
    ]
    d2, d2_after = before.distinct_2, after.distinct_2
    if d2 and d2_after is not None and d2_after < COLLAPSE_RATIO * d2:
        drop = 1 - d2_after / d2
        rows.append(
            (
                f"{prefix}: answer diversity",
                f"COLLAPSED: distinct-2 fell {drop:.0%}; read the held-out answers",
            )
        )
    return rows


def gold_rows(ppo: PolicyMetrics, prefix: str = "stage 3") -> list[tuple[str, str]]:
    """Stage 3's gold rows (gold score, best and malformed shares, the verdict; when a gold was known) and
    reward-hacking measures, before -> after; none for metrics written before they existed."""
    before, after = ppo.before, ppo.after
    rows: list[tuple[str, str]] = []
    if ppo.gold_gain is not None:
        gold = f"{before.gold_mean:+.3f} -> {after.gold_mean:+.3f} ({ppo.gold_reward})"
        rows.append((f"{prefix}: held-out gold score before -> after", gold))
        rows += label_share_rows(prefix, before, after)
        rows.append(
            (
                f"{prefix}: proxy vs gold",
                proxy_gold_verdict(ppo.score_gain, ppo.gold_gain, before, after),
            )
        )
    return rows + measure_rows(prefix, before, after)


def dpo_rows(dpo: PolicyMetrics, title: str = "DPO") -> list[tuple[str, str]]:
    """A preference stage's rows (DPO, KTO, ORPO or SimPO, titled `title`): held-out pair (KTO: row) accuracy
    and margin, the KL of its answers to the stage-1 policy (when it had a reference to measure it), and (when
    a gold was known) the gold score and the best and malformed shares before -> after, with the same
    reward-hacking measures as PPO's."""
    before, after = dpo.before, dpo.after
    unit = "row" if dpo.extra.get("loss_type") == "kto" else "pair"  # KTO's examples are labelled rows
    rows = [
        (
            f"{title}: held-out {unit} accuracy before -> after",
            f"{before.accuracy:.3f} -> {after.accuracy:.3f}",
        ),
        (f"{title}: held-out implicit-reward margin", f"{before.margin:+.3f} -> {after.margin:+.3f}"),
    ]
    if after.kl is not None:
        rows.append((f"{title}: final KL to the stage-1 policy (per sequence)", f"{after.kl:.3f}"))
    if before.gold_mean is not None and after.gold_mean is not None:
        gold = f"{before.gold_mean:+.3f} -> {after.gold_mean:+.3f} ({dpo.gold_reward})"
        rows.append((f"{title}: held-out gold score before -> after", gold))
        rows += label_share_rows(title, before, after)
    return rows + measure_rows(title, before, after)


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    rule = "=" * (width + 36)
    return "\n".join([rule, *(f"{label:<{width}}  {value}" for label, value in rows), rule])


def report(out: Path, ran: set[str]) -> None:
    """Plot the curves of every finished stage 3 (PPO, critic-free) and print the summary table and where
    things are."""
    from common.evaluation.plot import PNG_NAME, plot_ppo_curves

    pngs = {}
    for stage in RL_STAGES:
        metrics = stage.metrics_path(out)
        if metrics.is_file():
            try:
                pngs[stage] = plot_ppo_curves(metrics, metrics.with_name(PNG_NAME))
            except ValueError as e:
                print(f"note: no {stage.title} plot: {e}")
    rows = summary_rows(out, ran)
    if rows:
        print("\n" + format_table(rows))
    print(f"outputs:       {out}")
    print(f"stage logs:    {out}/<stage>/{STAGE_LOG}")
    if (out / "tensorboard").is_dir():
        print(f"TensorBoard:   tensorboard --logdir {out / 'tensorboard'}")
    for stage in RL_STAGES:
        answers, actor = stage.dir(out) / "heldout_answers.jsonl", stage.dir(out) / "actor"
        if stage in pngs:
            print(_label(f"{stage.title} curves:") + str(pngs[stage]))
        if answers.is_file():
            print(_label(f"{stage.title} answers:") + f"{answers} (held-out prompts, before / after)")
        if actor.is_dir():
            print(_label("chat with it:") + f"python chat.py --path {actor}")


def _label(text: str) -> str:
    return text.ljust(15) if len(text) < 15 else text + " "
