"""Gold evaluation in stage 3: loading and checking a --gold_reward function, its statistics,
the default evaluation interval, the over-optimisation panel of the plot, the summary's verdict in words, and
short stage-3 runs: a user gold function recorded at every held-out evaluation (at least 5 during PPO) and in
heldout_answers.jsonl, a gold function that fails stopping the run with its name and the sample."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from common.args import BUNDLED_DATA
from common.evaluation import plot
from common.evaluation.heldout import GoldReward, format_eval, gold_scores, gold_stats, load_gold_reward
from common.evaluation.metrics import AnswerEval, PolicyMetrics
from pipeline import report as pipeline_report
from step3_rlhf.plan import resolve_eval_interval
from tests.launch import run_failing_stage, run_stage

# ---------------------------------------------------------------------------------------------- loading


def test_auto_gold_is_the_bundled_one_on_the_bundled_data_only(tmp_path):
    from common.evaluation.gold import LABELS, synthetic_gold

    gold = load_gold_reward("auto", [BUNDLED_DATA])
    assert gold == GoldReward("common.evaluation.gold:synthetic_gold", synthetic_gold, LABELS)
    relative = os.path.relpath(BUNDLED_DATA)  # however the path is spelled
    assert load_gold_reward("auto", [relative]) == gold
    assert load_gold_reward("auto", [str(tmp_path)]) is None
    assert load_gold_reward("auto", [BUNDLED_DATA, str(tmp_path)]) is None
    assert load_gold_reward("none", [BUNDLED_DATA]) is None
    explicit = load_gold_reward("common.evaluation.gold:synthetic_gold", [str(tmp_path)])
    assert explicit is not None and explicit.fn is synthetic_gold


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("common.evaluation.gold", "expected 'module:function', 'auto' or 'none'"),
        ("no_such_module_xyz:f", "no module 'no_such_module_xyz' in the working directory"),
        (
            "common.evaluation.gold:no_such_function",
            "module 'common.evaluation.gold' has no 'no_such_function'",
        ),
        ("common.evaluation.gold:LABELS", "'LABELS' is a tuple, not a function"),
    ],
)
def test_a_gold_that_cannot_be_loaded_is_refused(spec, message):
    with pytest.raises(SystemExit, match=rf"--gold_reward .*{message}".replace("(", r"\(")):
        load_gold_reward(spec, [BUNDLED_DATA])


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class Scored:
    score: float
    label: str


def _gold(fn) -> GoldReward:
    return GoldReward("tests:fn", fn)


PROMPTS, RESPONSES, FINISHED = ["p0", "p1", "p2"], [" a", " b b", " c c c"], [True, False, True]


def test_gold_scores_take_floats_or_objects_with_score_and_label():
    floats = _gold(lambda p, r, f: [float(len(x)) for x in r])
    assert gold_scores(floats, PROMPTS, RESPONSES, FINISHED) == ([2.0, 4.0, 6.0], [None, None, None])
    np_floats = _gold(lambda p, r, f: np.array([0.5, 1, 2], dtype=np.float32))
    assert gold_scores(np_floats, PROMPTS, RESPONSES, FINISHED)[0] == [0.5, 1.0, 2.0]
    objects = _gold(lambda p, r, f: [Scored(1.0 if d else -1.0, "done" if d else "cut") for d in f])
    assert gold_scores(objects, PROMPTS, RESPONSES, FINISHED) == ([1.0, -1.0, 1.0], ["done", "cut", "done"])
    seen = []
    _gold(lambda p, r, f: seen.append((p, r, f)) or [0.0] * 3).fn(PROMPTS, RESPONSES, FINISHED)
    assert seen == [(PROMPTS, RESPONSES, FINISHED)]


def _raises_on_c(prompts, responses, finished):
    if any("c" in r for r in responses):
        raise KeyError("no c please")
    return [0.0] * len(responses)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (_raises_on_c, r"tests:fn raised KeyError: 'no c please' on held-out sample 2 \(answer ' c c c'\)"),
        (lambda p, r, f: [0.0, 1.0], "tests:fn returned 2 scores for 3 held-out answers"),
        (
            lambda p, r, f: [0.0, math.nan, 1.0],
            "tests:fn gave held-out sample 1 the score nan; expected a finite",
        ),
        (lambda p, r, f: [0.0, 1.0, "2"], "tests:fn gave held-out sample 2 the score '2'"),
        (lambda p, r, f: [True, 1.0, 2.0], "tests:fn gave held-out sample 0 the score True"),
        (
            lambda p, r, f: [Scored(0.0, "a"), Scored(1.0, 3), Scored(0.0, "b")],
            "tests:fn gave held-out sample 1 a non-string label 3",
        ),
    ],
)
def test_a_failing_gold_names_itself_and_the_sample(fn, message):
    with pytest.raises(SystemExit, match=f"--gold_reward {message}"):
        gold_scores(_gold(fn), PROMPTS, RESPONSES, FINISHED)


def test_gold_stats_mean_and_label_shares():
    gold = GoldReward("g:f", lambda p, r, f: [], labels=("best", "bad", "malformed"))
    stats = gold_stats(gold, [1.0, 0.0, -0.5, 1.0], ["best", "bad", "odd", "best"])
    assert stats == pytest.approx(
        {
            "gold_mean": 1.5 / 4,
            "gold_share_best": 0.5,
            "gold_share_bad": 0.25,
            "gold_share_malformed": 0.0,  # a label the gold can give, absent this time
            "gold_share_odd": 0.25,
        }
    )
    assert gold_stats(_gold(None), [2.0, 4.0], [None, None]) == {"gold_mean": 3.0}


def test_format_eval_line():
    stats = {
        "score": 0.5,
        "kl": 1.25,
        "response_length": 12.0,
        "eos_fraction": 0.75,
        "repeated_3gram_rate": 0.125,
        "distinct_2": 0.5,
        "leaked_turn_markers": 0.0,
    }
    measures = "eos 0.75 | len 12.0 | rep3 0.125 | distinct2 0.500 | turn markers 0.00"
    assert format_eval(stats) == f"proxy +0.500 | kl 1.250 | {measures}"
    gold = {**stats, "gold_mean": -0.25, "gold_share_best": 0.5, "gold_share_bad": 0.5}
    assert format_eval(gold) == f"proxy +0.500 | kl 1.250 | gold -0.250 | best 0.50 bad 0.50 | {measures}"


@pytest.mark.parametrize(
    ("iterations", "flag", "interval", "points"),
    [
        (30, None, 5, 5),
        (20, None, 3, 6),
        (35, None, 5, 6),
        (6, None, 1, 5),
        (3, None, 1, 2),
        (30, 0, 0, 0),
        (30, 4, 4, 7),
    ],
)
def test_default_eval_interval_gives_5_or_more_points_during_ppo(iterations, flag, interval, points):
    got = resolve_eval_interval(flag, iterations)
    assert got == interval
    assert sum(1 for step in range(1, iterations) if got and step % got == 0) == points


# ---------------------------------------------------------------------------------------------- plot, summary

METRICS = {
    "before": {"score": 0.1, "gold_mean": 0.2},
    "after": {"score": 0.9, "gold_mean": -0.3},
    "score_gain": 0.8,
    "gold_gain": -0.5,
    "final_kl": 2.0,
    "evals": [
        {"step": 0, "score": 0.1, "kl": 0.0, "gold_mean": 0.2, "response_length": 10.0},
        {"step": 2, "score": 0.5, "kl": 1.0, "gold_mean": 0.3, "response_length": 12.0},
        {"step": 3, "score": 0.9, "kl": 2.5, "gold_mean": -0.3, "response_length": 14.0},
    ],
    "history": [
        {"step": 1, "score_mean": 0.2, "kl": 0.0, "response_length": 11.0},
        {"step": 2, "score_mean": 0.5, "kl": 1.0, "response_length": 12.5},
        {"step": 3, "score_mean": 0.8, "kl": 2.0, "response_length": 13.0},
    ],
}


def test_overoptimisation_series_are_the_evals_against_their_kl():
    assert plot.overoptimisation_series(PolicyMetrics.from_dict(METRICS)) == {
        "score": ([0.0, 1.0, 2.5], [0.1, 0.5, 0.9]),
        "gold_mean": ([0.0, 1.0, 2.5], [0.2, 0.3, -0.3]),
    }
    no_gold = {
        **METRICS,
        "evals": [{k: v for k, v in e.items() if k != "gold_mean"} for e in METRICS["evals"]],
    }
    assert list(plot.overoptimisation_series(PolicyMetrics.from_dict(no_gold))) == ["score"]
    old = {**METRICS, "evals": [{"step": 0, "score": 0.1}]}  # written before evals recorded their KL
    assert plot.overoptimisation_series(PolicyMetrics.from_dict(old)) == {}


@pytest.mark.slow
def test_plot_adds_the_overoptimisation_panel_with_proxy_and_gold(tmp_path):
    png = plot.plot_ppo_curves(PolicyMetrics.from_dict(METRICS), tmp_path / "curves.png")
    image = matplotlib.image.imread(png)[..., :3]
    assert image.shape[:2] == (420, 2000)  # four panels of 5 inches at 100 dpi
    quarters = np.array_split(np.arange(image.shape[1]), 4)
    red = np.all(np.abs(image - np.array([214, 39, 40]) / 255) < 0.05, axis=-1)  # tab:red proxy
    green = np.all(np.abs(image - np.array([44, 160, 44]) / 255) < 0.05, axis=-1)  # tab:green gold
    assert red[:, quarters[3]].sum() > 50 and green[:, quarters[3]].sum() > 50
    assert green[:, np.concatenate(quarters[:3])].sum() == 0  # the gold is drawn in the last panel only


def test_monitor_charts_put_proxy_and_gold_on_one_tensorboard_chart(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    from common.training.monitor import Monitor
    from step3_rlhf.heldout import HELDOUT_CHARTS

    monitor = Monitor(True, tmp_path, "ppo")
    monitor.charts("held-out", HELDOUT_CHARTS)
    monitor.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    proto = events.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(proto).item())
    charts = {c.title: list(c.multiline.tag) for c in layout.category[0].chart}
    assert layout.category[0].title == "held-out"
    assert charts["proxy and gold"] == ["ppo/eval/score", "ppo/eval/gold_mean"]
    assert "ppo/eval/distinct_2" in charts["measures"]


@pytest.mark.parametrize(
    ("proxy", "gold", "verdict"),
    [
        (0.8, -0.5, "REWARD HACKING: the proxy rose but the gold did not (proxy +0.800, gold -0.500)"),
        (0.8, 0.0, "REWARD HACKING: the proxy rose but the gold did not (proxy +0.800, gold +0.000)"),
        (0.8, 0.25, "both rose: a real gain (proxy +0.800, gold +0.250)"),
        (-0.1, 0.25, "the gold rose though the proxy did not (proxy -0.100, gold +0.250)"),
        (-0.1, -0.25, "neither rose (proxy -0.100, gold -0.250)"),
    ],
)
def test_proxy_gold_verdict_in_words(proxy, gold, verdict):
    assert pipeline_report.proxy_gold_verdict(proxy, gold) == verdict


GOOD_BEFORE = AnswerEval.from_dict(
    {"gold_share_best": 0.17, "gold_share_malformed": 0.05, "distinct_2": 0.415}
)


@pytest.mark.parametrize(
    ("after", "failure"),
    [
        # the SmolLM2 collapse: the mean rose, the best share fell and the answers became one sentence
        (
            {"gold_share_best": 0.02, "gold_share_malformed": 0.05, "distinct_2": 0.074},
            "the best share fell (0.17 -> 0.02)",
        ),
        (
            {"gold_share_best": 0.5, "gold_share_malformed": 0.08, "distinct_2": 0.4},
            "the malformed share rose (0.05 -> 0.08)",
        ),
        (
            {"gold_share_best": 0.5, "gold_share_malformed": 0.05, "distinct_2": 0.2},
            "the answers collapsed (distinct-2 0.415 -> 0.200)",
        ),
    ],
)
def test_a_gold_gain_the_answers_contradict_is_no_real_gain(after, failure):
    verdict = pipeline_report.proxy_gold_verdict(0.8, 0.25, GOOD_BEFORE, AnswerEval.from_dict(after))
    assert verdict.startswith("NOT a real gain: the gold mean rose, but ") and failure in verdict, verdict
    assert verdict.endswith("(proxy +0.800, gold +0.250)")


@pytest.mark.parametrize(
    "after",
    [
        {
            "gold_share_best": 0.5,
            "gold_share_malformed": 0.07,
            "distinct_2": 0.3,
        },  # +0.02 malformed: tolerated
        {
            "gold_share_best": 0.17,
            "gold_share_malformed": 0.0,
            "distinct_2": 0.208,
        },  # best level, distinct-2 at 0.5x
    ],
)
def test_a_gold_gain_within_the_tolerances_is_a_real_gain(after):
    assert pipeline_report.proxy_gold_verdict(0.8, 0.25, GOOD_BEFORE, AnswerEval.from_dict(after)).startswith(
        "both rose: a real gain"
    )


# ---------------------------------------------------------------------------------------------- stage-3 runs

USER_GOLD = '''
from dataclasses import dataclass


@dataclass
class Score:
    score: float
    label: str


def words(prompts, responses, finished):
    """One point per word, up to 10; labelled by whether the answer ended with EOS."""
    assert len(prompts) == len(responses) == len(finished)
    return [Score(min(len(r.split()), 10) / 10, "ended" if f else "cut") for r, f in zip(responses, finished)]


def nan_on_fourth(prompts, responses, finished):
    return [float("nan") if i == 3 else 0.0 for i in range(len(responses))]
'''


@pytest.fixture(scope="module")
def ppo_models(tiny_dir, tmp_path_factory) -> list[str]:
    """The tiny default as actor, a reward model with a fresh head on it as critic and reward model."""
    from common.models.loading import load_tokenizer
    from common.models.reward_model import load_reward_model_for_training
    from common.models.saving import save_reward_model

    root = tmp_path_factory.mktemp("gold_models")
    tok = load_tokenizer(str(tiny_dir))
    save_reward_model(load_reward_model_for_training(str(tiny_dir), tok), root / "rm", tok, 0)
    (root / "user_gold.py").write_text(USER_GOLD)
    return [
        *("--actor_model_name_or_path", str(tiny_dir), "--critic_model_name_or_path", str(root / "rm")),
        *("--data_output_path", str(root / "cache"), "--data_split", "1,1,98", "--eval_num_prompts", "8"),
        *("--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4"),
        *("--max_prompt_seq_len", "32", "--max_answer_seq_len", "12", "--seed", "7"),
    ]


@pytest.fixture
def user_gold_on_path(ppo_models, monkeypatch) -> None:
    root = Path(ppo_models[ppo_models.index("--critic_model_name_or_path") + 1]).parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.slow
def test_user_gold_is_recorded_at_every_evaluation(ppo_models, user_gold_on_path, tmp_path):
    out = tmp_path / "ppo"
    args = [*ppo_models, "--output_dir", str(out), "--gold_reward", "user_gold:words", "--enable_tensorboard"]
    log = run_stage("step3_rlhf/main.py", [*args, "--enable_test_mode", "--test_stop_step", "6"], num_procs=1)
    metrics = json.loads((out / "ppo_metrics.json").read_text())
    assert metrics["gold_reward"] == "user_gold:words" and metrics["eval_interval"] == 1
    evals = metrics["evals"]
    assert [e["step"] for e in evals] == [0, 1, 2, 3, 4, 5, 6]  # before, 5 during PPO, after
    for e in evals:
        assert 0 <= e["gold_mean"] <= 1
        shares = {k: v for k, v in e.items() if k.startswith("gold_share_")}
        assert set(shares) <= {"gold_share_ended", "gold_share_cut"} and sum(
            shares.values()
        ) == pytest.approx(1)
        assert shares.get("gold_share_ended", 0.0) == pytest.approx(
            e["eos_fraction"]
        )  # `finished` came right
        assert (
            0 < e["distinct_2"] <= 1
            and 0 <= e["repeated_3gram_rate"] < 1
            and 0 <= e["leaked_turn_markers"] <= 1
        )
    assert evals[0]["kl"] == 0.0  # the actor is the reference before the first update
    assert metrics["gold_gain"] == pytest.approx(
        metrics["after"]["gold_mean"] - metrics["before"]["gold_mean"]
    )
    assert "[ppo] gold reward of held-out answers: user_gold:words" in log and "[ppo] gold gain" in log
    assert log.count("[ppo] held-out at step") == 5

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("ppo/eval/gold_mean")]
    assert logged == [(e["step"], pytest.approx(e["gold_mean"])) for e in evals]

    rows = [json.loads(line) for line in (out / "heldout_answers.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    eos = "<|endoftext|>"
    for when in ("before", "after"):
        for r in rows:  # the gold scored the answer without special tokens, `finished` = it ended with EOS
            text = r[when].removesuffix(eos)
            assert r[f"gold_{when}"] == pytest.approx(min(len(text.split()), 10) / 10)
            assert r[f"gold_label_{when}"] == ("ended" if r[when].endswith(eos) else "cut")
        mean = sum(r[f"gold_{when}"] for r in rows) / len(rows)
        assert mean == pytest.approx(metrics[when]["gold_mean"])


@pytest.mark.slow
def test_a_gold_giving_nan_stops_the_run_naming_it_and_the_sample(ppo_models, user_gold_on_path, tmp_path):
    out = tmp_path / "ppo"
    args = [*ppo_models, "--output_dir", str(out), "--gold_reward", "user_gold:nan_on_fourth"]
    proc = run_failing_stage("step3_rlhf/main.py", [*args, "--enable_test_mode", "--test_stop_step", "1"])
    assert "--gold_reward user_gold:nan_on_fourth gave held-out sample 3 the score nan" in proc.stderr
    assert "[ppo] step 1/1" not in proc.stdout  # stopped at the evaluation before PPO
    assert not (out / "ppo_metrics.json").exists()


@pytest.mark.slow
def test_a_gold_that_cannot_be_imported_stops_the_run_before_any_compute(ppo_models, tmp_path):
    out = tmp_path / "ppo"
    args = [*ppo_models, "--output_dir", str(out), "--gold_reward", "nowhere:f"]
    proc = run_failing_stage("step3_rlhf/main.py", args)
    assert "--gold_reward nowhere:f: no module 'nowhere' in the working directory" in proc.stderr
    assert not out.exists()  # stopped before the output directory was claimed
