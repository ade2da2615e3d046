"""The gold reward of the bundled task (common/evaluation/gold.py) on hand-written answers of every kind."""

from __future__ import annotations

import itertools

import pytest

from common.evaluation.gold import (
    CREDIT_WEIGHTS,
    GoldScore,
    gold_score,
    malformed_credit,
    summarize,
    synthetic_gold,
)
from common.evaluation.synthetic_task import CLOSERS, GENERIC, OPENERS, REFUSALS, RUDE, TOPICS, response_level

PROMPT = "\n\nHuman: How do I cook rice?\n\nAssistant:"
RICE = next(t for t in TOPICS if t.thing == "rice")
TEA = next(t for t in TOPICS if t.thing == "tea")
TIP = RICE.tips[
    0
]  # "Rinse the rice, use two cups of water per cup, and simmer it covered for fifteen minutes."
BEST = f" Of course! {TIP} Good luck!"


def _gold(response: str, finished: bool = True) -> GoldScore:
    return gold_score(PROMPT, response, finished)


def test_weights_sum_to_one():
    assert sum(CREDIT_WEIGHTS.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (BEST, GoldScore(1.0, "best")),
        (f"Happy to help! {RICE.tips[1]} Have fun with it!\n", GoldScore(1.0, "best")),  # whitespace ignored
        (f" {TIP}", GoldScore(0.5, "mediocre")),  # curt
        (f" Of course! {GENERIC[1]}", GoldScore(0.5, "mediocre")),  # vague
        (f" {RUDE[0]}", GoldScore(0.0, "bad")),
        (f" {REFUSALS[1]}", GoldScore(0.0, "bad")),
        (
            f" I would rather talk about tea. {TEA.tips[0]}",
            GoldScore(0.0, "bad"),
        ),  # off topic, but grammatical
    ],
)
def test_well_formed_answers_keep_the_grammar_order(response, expected):
    assert _gold(response) == expected


# Malformed answers: score = -1 + 0.9 * credit, credit = the weighted sum of the components (hand-computed).
@pytest.mark.parametrize(
    ("name", "response", "finished", "credit"),
    [
        # every component but `ends`: 1 - 0.15
        ("best text cut by the length budget", BEST, False, 0.85),
        # two openers: all components hold, yet the grammar has no such answer -> the top of the malformed range
        ("two openers", f" Of course! Happy to help! {TIP} Good luck!", True, 1.0),
        # ends .15 + tip .3 + opener .1 + single_turn .05 + clean .2 * 3/5 (repeats are unclean)
        ("stacked closers", f" Of course! {TIP} Good luck! Good luck! Good luck!", True, 0.72),
        # ends .15 + opener .1 + single_turn .05 + no_repeat .1 + clean .2 * 1/3
        (
            "polite word salad",
            " Great question! ways to help! There are probably find a your situation, with it that do work fine.",
            True,
            0.15 + 0.1 + 0.05 + 0.1 + 0.2 / 3,
        ),
        # opener .1 + single_turn .05 + no_repeat .1 + clean .2 * 1/2
        ("truncated mid-tip, no EOS", " Of course! Rinse the rice, use two cups of", False, 0.35),
        ("truncated mid-tip, then EOS", " Of course! Rinse the rice, use two cups of", True, 0.5),
        # ends .15 + tip .3 + opener .1 + no_repeat .1 + clean .2 * 3/4 (the last sentence is "Human: ...")
        ("a second turn", f"{BEST}\n\nHuman: Great question!", True, 0.8),
        # ends .15 + opener .1 + closer .1 + single_turn .05 + no_repeat .1 + clean .2 * 2/3
        ("off-topic tip in polite framing", f" Of course! {TEA.tips[0]} Good luck!", True, 0.5 + 0.4 / 3),
        # ends .15 + tip .3 + single_turn .05 + no_repeat .1 + clean .2 * 2/2
        ("closer before the tip", f" Good luck! {TIP}", True, 0.8),
        # a repeated three-word sequence inside one sentence: ends .15 + tip .3 + opener .1 + closer .1 +
        # single_turn .05 + clean .2 * 3/4
        ("repeated words", f" Of course! {TIP} the rice the rice the rice. Good luck!", True, 0.85),
        ("empty answer", "", True, 0.15),
        ("empty answer, no EOS", "", False, 0.0),
    ],
)
def test_malformed_answers_get_partial_credit_below_every_well_formed_answer(
    name, response, finished, credit
):
    score = _gold(response, finished)
    assert score.label == "malformed", name
    assert score.score == pytest.approx(-1.0 + 0.9 * credit), name
    assert -1.0 <= score.score <= -0.1 < 0.0  # below a well-formed bad answer


def test_credit_components_of_stacked_closers():
    credit = malformed_credit(PROMPT, f" Of course! {TIP} Good luck! Good luck! Good luck!", True)
    assert credit == {
        "ends": 1.0,
        "tip": 1.0,
        "opener": 1.0,
        "closer": 0.0,
        "single_turn": 1.0,
        "no_repeat": 0.0,
        "clean": pytest.approx(3 / 5),
    }


def test_a_policy_can_climb_from_word_salad_to_best():
    ladder = [
        " ways to help! find a your situation",  # no EOS
        " ways to help! find a your situation.",
        f" Great question! {TIP} Good luck! Good luck!",
        f" Great question! {TIP} Good luck!",
    ]
    scores = [_gold(text, finished=i > 0).score for i, text in enumerate(ladder)]
    assert scores == sorted(scores) and len(set(scores)) == len(scores)
    assert scores[-1] == 1.0


def test_every_grammar_answer_scores_its_level():
    expected = {2: 1.0, 1: 0.5, 0: 0.0}
    answers = [f" {o} {t} {c}" for o, t, c in itertools.product(OPENERS, RICE.tips, CLOSERS)]
    answers += [f" {t}" for t in RICE.tips] + [f" {o} {g}" for o, g in itertools.product(OPENERS, GENERIC)]
    answers += [f" {line}" for line in RUDE + REFUSALS]
    for answer in answers:
        assert _gold(answer).score == expected[response_level(PROMPT, answer)], answer


def test_multi_turn_prompt_is_graded_on_its_last_question():
    multi = (
        f"\n\nHuman: How do I make a cup of tea?\n\nAssistant: Of course! {TEA.tips[0]} Good luck!{PROMPT}"
    )
    assert gold_score(multi, BEST, True) == GoldScore(1.0, "best")
    assert gold_score(multi, f" Of course! {TEA.tips[0]} Good luck!", True).label == "malformed"


def test_synthetic_gold_batch_and_errors():
    scores = synthetic_gold([PROMPT, PROMPT], [BEST, f" {TIP}"], [True, True])
    assert scores == [GoldScore(1.0, "best"), GoldScore(0.5, "mediocre")]
    with pytest.raises(ValueError, match="2 prompts, 1 responses and 2 flags"):
        synthetic_gold([PROMPT, PROMPT], [BEST], [True, True])
    with pytest.raises(ValueError, match="prompt 1 is not a prompt of the bundled synthetic task"):
        synthetic_gold([PROMPT, "\n\nHuman: How do I juggle?\n\nAssistant:"], [BEST, BEST], [True, True])
    with pytest.raises(ValueError, match="prompt 0"):
        synthetic_gold(["How do I cook rice?"], [BEST], [True])


def test_summarize():
    scores = [
        GoldScore(1.0, "best"),
        GoldScore(0.5, "mediocre"),
        GoldScore(-0.5, "malformed"),
        GoldScore(1.0, "best"),
    ]
    assert summarize(scores) == {
        "gold_mean": 0.5,
        "best": 0.5,
        "mediocre": 0.25,
        "bad": 0.0,
        "malformed": 0.25,
    }
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def test_heldout_answers_are_cut_at_the_first_eos():
    from bench.gold_eval import split_at_eos

    assert split_at_eos(f"{BEST}<|endoftext|><pad><pad>") == (BEST, True)
    assert split_at_eos(f"{BEST} Good luck!<|endoftext|> more<|endoftext|>") == (f"{BEST} Good luck!", True)
    assert split_at_eos(" Of course! Rinse the rice, use two") == (
        " Of course! Rinse the rice, use two",
        False,
    )
