"""PPO improves the policy by the ground truth: the tiny default (e2e_rlhf.py --tiny: SFT -> reward model ->
PPO, the demo's settings) raises the gold reward of held-out answers, not only the reward model's score, by
the margins of issue 13: best share +0.30 or more, malformed share at most 0.10 and no higher than before.

Opt-in (`GOLD_PIPELINE=1 bash scripts/test.sh tests/test_gold_pipeline.py`, about 5 minutes on 2 cores): the
whole default suite already takes ~14.5 of its 15 minutes. A shortened pipeline does not show the gain: with
5 SFT epochs and 2 reward-model epochs (3 minutes) the stage-1 policy confuses topics on held-out phrasings and
the reward model scores polite framing, and PPO lowered the gold (+0.34 -> +0.08, measured 2026-12-02)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gold_eval import split_at_eos
from common.gold import summarize, synthetic_gold

REPO = Path(__file__).resolve().parents[1]


def gold_of(answers_file: Path, column: str) -> dict[str, float]:
    """The gold summary of one column ("before" / "after") of stage 3's heldout_answers.jsonl."""
    rows = [json.loads(line) for line in answers_file.read_text().splitlines()]
    cut = [split_at_eos(r[column]) for r in rows]
    scores = synthetic_gold([r["prompt"] for r in rows], [c[0] for c in cut], [c[1] for c in cut])
    return summarize(scores)


@pytest.mark.skipif(
    os.environ.get("GOLD_PIPELINE") != "1", reason="opt-in, ~5 min: set GOLD_PIPELINE=1 (see the docstring)"
)
def test_tiny_default_pipeline_raises_the_gold(tmp_path):
    out = tmp_path / "pipeline"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    proc = subprocess.run(
        [sys.executable, "e2e_rlhf.py", "--tiny", "--output-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    answers = out / "ppo" / "heldout_answers.jsonl"
    before, after = gold_of(answers, "before"), gold_of(answers, "after")
    print(f"gold before {before}\ngold after  {after}")
    assert len(answers.read_text().splitlines()) == 128
    assert after["gold_mean"] >= before["gold_mean"] + 0.1, (before, after)
    assert after["best"] >= before["best"] + 0.30, (before, after)
    assert after["malformed"] <= min(0.10, before["malformed"]), (before, after)
    assert "both rose: a real gain" in proc.stdout, proc.stdout[-3000:]
