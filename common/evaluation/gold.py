"""The gold reward of the bundled synthetic task: a graded ground-truth score of any answer to a prompt.

The reward model of stage 2 is a *proxy* trained on preference pairs; this is the *gold* reward it
approximates (Gao et al., "Scaling Laws for Reward Model Overoptimization"): PPO optimises the proxy, and
the gold tells whether the policy really got better. It is defined only for prompts of the bundled task
(`common/evaluation/synthetic_task.py`, the grammar of `data/synthetic/`).

Scale (higher is better):
    best       1.0   a well-formed best answer: polite opener + a tip of the prompt's topic + closer
    mediocre   0.5   a well-formed mediocre answer: the tip alone, or an opener + generic advice
    bad        0.0   a well-formed bad answer: rude, a refusal, or politely off topic
    malformed  -1.0 + 0.9 * credit, in [-1.0, -0.1]: any other text, or an answer that did not end with EOS
"Well-formed" means `synthetic_task.response_level` recognises the text exactly (surrounding whitespace
ignored) and the answer ended with EOS within the length budget; well-formed answers keep the grammar's
order and every malformed text scores below all of them.

Partial credit of a malformed text (weights sum to 1, so a policy can climb towards well-formed answers).
The text is split into sentences after ".", "!" or "?" followed by whitespace:
    ends         0.15  the answer ended with EOS within the length budget
    tip          0.30  a tip of the prompt's topic is one of the sentences
    opener       0.10  the first sentence is a polite opener
    closer       0.10  the last sentence is a closer, and no other sentence is one
    single_turn  0.05  no "Human:" or "Assistant:" (the answer does not write a further turn)
    no_repeat    0.10  no sentence occurs twice and no three-word sequence repeats
    clean        0.20  x the share of sentences that a good answer to this prompt may contain (openers,
                       closers, the topic's tips, generic advice), a repeated sentence counting as unclean
An empty answer earns only `ends`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from common.evaluation.synthetic_task import (
    BAD,
    BEST,
    CLOSERS,
    GENERIC,
    MEDIOCRE,
    OPENERS,
    TOPICS,
    UNRECOGNISED,
    prompt_topic,
    response_level,
)

LEVEL_SCORES: dict[int, float] = {BEST: 1.0, MEDIOCRE: 0.5, BAD: 0.0}
LEVEL_LABELS: dict[int, str] = {BEST: "best", MEDIOCRE: "mediocre", BAD: "bad", UNRECOGNISED: "malformed"}
LABELS = ("best", "mediocre", "bad", "malformed")
CREDIT_WEIGHTS: dict[str, float] = {
    "ends": 0.15,
    "tip": 0.30,
    "opener": 0.10,
    "closer": 0.10,
    "single_turn": 0.05,
    "no_repeat": 0.10,
    "clean": 0.20,
}
MALFORMED_FLOOR = -1.0
MALFORMED_SPAN = (
    0.9  # malformed scores lie in [MALFORMED_FLOOR, MALFORMED_FLOOR + MALFORMED_SPAN] = [-1, -0.1]
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TURN_MARKERS = ("Human:", "Assistant:")


@dataclass(frozen=True)
class GoldScore:
    """The gold reward of one answer: `score` on the scale of the module docstring, `label` in LABELS."""

    score: float
    label: str


def sentences(text: str) -> list[str]:
    """The sentences of text: split after ".", "!" or "?" followed by whitespace; empty pieces dropped."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


@cache
def _allowed_sentences(topic_index: int) -> frozenset[str]:
    return frozenset(OPENERS + CLOSERS + GENERIC + TOPICS[topic_index].tips)


def _has_repeated_trigram(words: list[str]) -> bool:
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(trigrams)) < len(trigrams)


def malformed_credit(prompt: str, response: str, finished: bool) -> dict[str, float]:
    """Each partial-credit component of the module docstring for one answer, in [0, 1] (unweighted).

    Raises ValueError if the prompt is not a prompt of the bundled task.
    """
    topic = prompt_topic(prompt)
    parts = sentences(response)
    credit = dict.fromkeys(CREDIT_WEIGHTS, 0.0)
    credit["ends"] = float(finished)
    if not parts:
        return credit
    closers = [s for s in parts if s in CLOSERS]
    allowed = _allowed_sentences(topic)
    seen: set[str] = set()
    clean = 0
    for s in parts:
        clean += s in allowed and s not in seen
        seen.add(s)
    credit["tip"] = float(any(s in TOPICS[topic].tips for s in parts))
    credit["opener"] = float(parts[0] in OPENERS)
    credit["closer"] = float(len(closers) == 1 and parts[-1] in CLOSERS)
    credit["single_turn"] = float(not any(marker in response for marker in _TURN_MARKERS))
    credit["no_repeat"] = float(len(seen) == len(parts) and not _has_repeated_trigram(response.split()))
    credit["clean"] = clean / len(parts)
    return credit


def gold_score(prompt: str, response: str, finished: bool) -> GoldScore:
    """The gold reward of one answer (see the module docstring); ValueError for a prompt of another task."""
    level = response_level(prompt, response) if finished else UNRECOGNISED
    if level != UNRECOGNISED:
        return GoldScore(LEVEL_SCORES[level], LEVEL_LABELS[level])
    credit = malformed_credit(prompt, response, finished)
    total = sum(CREDIT_WEIGHTS[name] * value for name, value in credit.items())
    # Rounded so that the top of the range is exactly -0.1, not -0.09999999999999998.
    return GoldScore(round(MALFORMED_FLOOR + MALFORMED_SPAN * total, 9), LEVEL_LABELS[UNRECOGNISED])


def synthetic_gold(prompts: list[str], responses: list[str], finished: list[bool]) -> list[GoldScore]:
    """The gold reward of a batch of answers to prompts of the bundled synthetic task.

    prompts[i]: the prompt text as in the data ("\\n\\nHuman: ...\\n\\nAssistant:", possibly multi-turn);
    responses[i]: the answer decoded without special tokens and cut at the first EOS; finished[i]: the answer
    ended with EOS within the length budget. Returns one GoldScore per answer, in order. Raises ValueError
    if the lists differ in length or a prompt is not of the bundled task (naming its index).
    """
    if not len(prompts) == len(responses) == len(finished):
        raise ValueError(
            f"synthetic_gold needs one response and one finished flag per prompt, got {len(prompts)} "
            f"prompts, {len(responses)} responses and {len(finished)} flags"
        )
    scores = []
    for i, (prompt, response, done) in enumerate(zip(prompts, responses, finished, strict=True)):
        try:
            scores.append(gold_score(prompt, response, bool(done)))
        except ValueError as e:
            raise ValueError(
                f"synthetic_gold: prompt {i} is not a prompt of the bundled synthetic task: {e}"
            ) from e
    return scores


def summarize(scores: list[GoldScore]) -> dict[str, float]:
    """The gold mean and the share of each label: {"gold_mean", "best", "mediocre", "bad", "malformed"}."""
    if not scores:
        raise ValueError("summarize needs at least one GoldScore")
    n = len(scores)
    return {
        "gold_mean": sum(s.score for s in scores) / n,
        **{label: sum(s.label == label for s in scores) / n for label in LABELS},
    }
