"""The metrics schema: what a stage writes reads back as the same typed object and the same JSON; a file that is
not one names itself and the key it lacks; keys the schema does not name survive a round trip."""

from __future__ import annotations

import json

import pytest

from common.evaluation.metrics import (
    AnswerEval,
    MetricsFileError,
    PairEval,
    PolicyMetrics,
    RewardModelMetrics,
    SFTMetrics,
    write_metrics,
)

EVAL = {
    "score": 0.5,
    "kl": 1.25,
    "response_length": 21.5,
    "eos_fraction": 1.0,
    "repeated_3gram_rate": 0.0,
    "distinct_2": 0.3,
    "leaked_turn_markers": 0.0,
    "gold_mean": 0.75,
    "gold_share_best": 0.5,
    "gold_share_mediocre": 0.25,
    "gold_share_malformed": 0.25,
}
PPO = {
    "before": EVAL,
    "after": {**EVAL, "score": 1.0, "gold_mean": 0.875},
    "score_gain": 0.5,
    "gold_gain": 0.125,
    "final_kl": 2.0,
    "gold_reward": "common.evaluation.gold:synthetic_gold",
    "algorithm": {"advantage_estimator": "gae"},
    "peak_memory_mb": 512.0,  # a key no reader needs: kept in extra
    "evals": [{"step": 0, **EVAL}],
    "history": [{"step": 1, "kl": 2.0}],
}


def test_an_evaluation_reads_its_gold_shares_by_label():
    e = AnswerEval.from_dict({**EVAL, "step": 5, "new_measure": 3})
    assert e.step == 5 and e.gold_mean == 0.75 and e.kl == 1.25
    assert e.gold_shares == {"best": 0.5, "mediocre": 0.25, "malformed": 0.25}
    assert e.share("best") == 0.5 and e.share("bad") is None  # a label the gold did not give
    assert e.accuracy is None and e.extra == {"new_measure": 3}
    assert e.to_dict() == {**EVAL, "step": 5, "new_measure": 3}


def test_policy_metrics_round_trip_through_a_file(tmp_path):
    path = tmp_path / "ppo_metrics.json"
    write_metrics(PolicyMetrics.from_dict(PPO), path)
    assert json.loads(path.read_text()) == PPO
    m = PolicyMetrics.read(path)
    assert m.after.gold_mean - m.before.gold_mean == m.gold_gain
    assert m.extra == {"peak_memory_mb": 512.0} and m.history == [{"step": 1, "kl": 2.0}]


def test_dpo_metrics_have_no_history_and_no_score():
    dpo = {
        "before": {"accuracy": 0.5, "margin": 0.0, **EVAL},
        "after": {"accuracy": 0.75, "margin": 1.5, **EVAL},
        "final_kl": 0.4,
        "gold_reward": None,
        "evals": [],
        "beta": 0.5,
    }
    m = PolicyMetrics.from_dict(dpo)
    assert m.history is None and m.score_gain is None and m.after.accuracy == 0.75 and m.after.margin == 1.5
    assert m.to_dict() == dpo


def test_stage_1_and_2_metrics_round_trip(tmp_path):
    sft = {"perplexity_per_epoch": [30.0, 1.5], "optimizer_steps": 56, "skipped_nonfinite_steps": 0}
    (tmp_path / "sft.json").write_text(json.dumps(sft))
    s = SFTMetrics.read(tmp_path / "sft.json")
    assert s.perplexity_per_epoch == [30.0, 1.5] and s.saved_logits_max_abs_diff is None
    assert s.to_dict() == sft
    s.saved_logits_max_abs_diff = 0.0
    assert s.to_dict()["saved_logits_max_abs_diff"] == 0.0
    rm = {
        "eval_curve": [{"step": 10, "accuracy": 0.7}],
        "final": {"pairs": 64, "accuracy": 0.875, "loss": 0.3},
        "normalization": {"gain": 1.0, "bias": 0.0},
        "optimizer_steps": 10,
        "skipped_nonfinite_steps": 0,
    }
    write_metrics(
        RewardModelMetrics(PairEval.from_dict(rm["final"]), **{k: v for k, v in rm.items() if k != "final"}),
        tmp_path / "rm.json",
    )
    r = RewardModelMetrics.read(tmp_path / "rm.json")
    assert r.final.accuracy == 0.875 and r.final.pairs == 64 and r.final.extra == {"loss": 0.3}
    assert r.to_dict() == rm


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"before": {}}', "no 'after'"),
        ('{"before": {}, "after": 0.5}', "after: a float, not a JSON object"),
        ("[1, 2]", "a list, not a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_file_that_is_not_one_is_named_with_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "ppo_metrics.json"
    path.write_text(content)
    with pytest.raises(MetricsFileError, match=message) as caught:
        PolicyMetrics.read(path)
    assert str(path) in str(caught.value)


def test_a_reward_model_file_without_final_pairs_is_refused(tmp_path):
    path = tmp_path / "rm_metrics.json"
    path.write_text(json.dumps({"final": {"accuracy": 0.9}}))
    with pytest.raises(MetricsFileError, match="rm_metrics.json: final: no 'pairs'"):
        RewardModelMetrics.read(path)
