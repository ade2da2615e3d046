"""PPO improves the policy by the ground truth: a shortened run of the tiny default (e2e_rlhf.py --tiny: SFT ->
reward model -> PPO, the demo's settings with fewer steps) raises the gold reward of held-out answers, not
only the reward model's score."""

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
# The demo's settings (launch/tiny/single_gpu.sh) with fewer SFT epochs, PPO iterations and held-out prompts.
SHORTENED = [
    "--step1-args=--num_train_epochs 6",
    "--step2-args=--normalization_num_samples 128",
    "--step3-args=--test_stop_step 16 --eval_num_prompts 64",
]


def gold_of(answers_file: Path, column: str) -> dict[str, float]:
    """The gold summary of one column ("before" / "after") of stage 3's heldout_answers.jsonl."""
    rows = [json.loads(line) for line in answers_file.read_text().splitlines()]
    cut = [split_at_eos(r[column]) for r in rows]
    scores = synthetic_gold([r["prompt"] for r in rows], [c[0] for c in cut], [c[1] for c in cut])
    return summarize(scores)


@pytest.mark.skip(
    reason="issue 13 item 5 is open: with the current tiny defaults PPO lowers the held-out gold (the reward "
    "model prefers polite off-topic tips and some malformed text); remove this mark when PPO raises it"
)
def test_shortened_tiny_pipeline_raises_the_gold(tmp_path):
    out = tmp_path / "pipeline"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    proc = subprocess.run(
        [sys.executable, "e2e_rlhf.py", "--tiny", "--output-dir", str(out), *SHORTENED],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    answers = out / "ppo" / "heldout_answers.jsonl"
    before, after = gold_of(answers, "before"), gold_of(answers, "after")
    print(f"gold before {before}\ngold after  {after}")
    assert len(answers.read_text().splitlines()) == 64
    # The gold itself rises, and by more than the sampling noise of 64 answers; the policy is not made worse
    # in form (no more malformed answers than the stage-1 policy wrote).
    assert after["gold_mean"] >= before["gold_mean"] + 0.1, (before, after)
    assert after["malformed"] <= before["malformed"], (before, after)
    assert after["best"] > before["best"], (before, after)
