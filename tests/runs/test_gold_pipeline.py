"""PPO improves the policy by the ground truth: the README's main command (e2e_rlhf.py --tiny: SFT -> three
reward models -> PPO on the lowest of their scores, at the demo's settings) raises the gold reward of held-out
answers, not only the reward model's score.

The margins are the multi-seed study's (docs/results.md, "Measured on the tiny default, over seeds": `e2e_rlhf.py --tiny
--seeds 1,2,3,4,5`), set below the worst seed with room to spare: another CPU rounds differently from stage 1
on and so draws another trajectory, and this test must pass on any of them.

Stages 1 and 2 come from the session fixture `demo_stages` (tests/conftest.py: `e2e_rlhf.py --tiny --step 1
2`, ~7 min); this test runs the same command without --step, so the pipeline skips the finished stages and
runs PPO (~1 min). Nothing is shortened: a shortened pipeline does not show the gain (5 SFT epochs and 2
reward-model epochs lowered the gold, +0.34 -> +0.08, measured 2026-12-02)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.gold_eval import split_at_eos
from common.evaluation.gold import summarize, synthetic_gold
from tests.launch import run_e2e

pytestmark = pytest.mark.slow  # the demo's pipeline


def gold_of(answers_file: Path, column: str) -> dict[str, float]:
    """The gold summary of one column ("before" / "after") of stage 3's heldout_answers.jsonl, graded here
    again from the answer texts (not read from the stage's own gold columns)."""
    rows = [json.loads(line) for line in answers_file.read_text().splitlines()]
    cut = [split_at_eos(r[column]) for r in rows]
    scores = synthetic_gold([r["prompt"] for r in rows], [c[0] for c in cut], [c[1] for c in cut])
    return summarize(scores)


# Below the worst of the seeds measured (docs/results.md, "Measured on the tiny default, over seeds"): gold gain +0.143,
# best-share gain +0.312, malformed share after 0.062 in the worst seed.
MIN_GOLD_GAIN = 0.08
MIN_BEST_GAIN = 0.20
MAX_MALFORMED = 0.10


def test_tiny_default_pipeline_raises_the_gold(demo_stages):
    out = demo_stages
    log = run_e2e(out)
    assert log.count("skipped, finished") == 2 and "== step 3: PPO" in log

    # the stages it builds on learnt: the stage-1 model writes the grammar, the reward model ranks by content
    ppl = json.loads((out / "sft" / "sft_metrics.json").read_text())["perplexity_per_epoch"]
    assert ppl[-1] < 1.5 and ppl[0] > 100, ppl
    assert json.loads((out / "rm" / "rm_metrics.json").read_text())["final"]["accuracy"] >= 0.75

    answers = out / "ppo" / "heldout_answers.jsonl"
    before, after = gold_of(answers, "before"), gold_of(answers, "after")
    print(f"gold before {before}\ngold after  {after}")
    assert len(answers.read_text().splitlines()) == 128
    assert after["gold_mean"] >= before["gold_mean"] + MIN_GOLD_GAIN, (before, after)
    assert after["best"] >= before["best"] + MIN_BEST_GAIN, (before, after)
    assert after["malformed"] <= MAX_MALFORMED, (before, after)
    assert "REWARD HACKING" not in log and "COLLAPSED" not in log, log[-3000:]
    algorithm = json.loads((out / "ppo" / "ppo_metrics.json").read_text())["algorithm"]
    assert algorithm["reward_ensemble"]["aggregation"] == "min"
    assert algorithm["reward_ensemble"]["members"] == [str(out / d) for d in ("rm", "rm-2", "rm-3")]

    # the summary table, each stage's log and TensorBoard events, the PNG and the models
    for label in (
        "stage 1: held-out perplexity before -> after",
        "stage 2: held-out pairwise accuracy",
        "stage 3: held-out RM score, stage-1 policy",
        "stage 3: held-out RM score, PPO policy",
        "stage 3: final KL to the reference (per sequence)",
        "stage 3: held-out gold score before -> after",
        "stage 3: held-out malformed share",
        "stage 3: proxy vs gold",
        "stage 3: distinct-2",
        "wall time: step 3 (PPO)",
    ):
        assert label in log
    for name, tag in (("sft", "[sft]"), ("rm", "[reward]"), ("ppo", "[ppo]")):
        assert tag in (out / name / "training.log").read_text()
        assert list((out / "tensorboard" / name).glob("events.out.tfevents.*")), name
    assert (out / "ppo" / "ppo_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for model_dir in ("sft", "rm", "rm-2", "rm-3", "ppo/actor", "ppo/critic"):
        assert (out / model_dir / "model.safetensors").is_file(), model_dir
