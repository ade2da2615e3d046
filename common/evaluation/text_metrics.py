"""Measures of a set of sampled answers that flag reward hacking on any data, without a gold scorer.

A reward model is fooled by degenerate text carrying its favourite words; these measures see it. Each takes
the answers of one evaluation, as token ids without the final EOS (and without padding):

    repeated_ngram_rate  share of the answers' n-grams (n = 3) that repeat an n-gram seen earlier in the same
                         answer (rises with loops: "great great great ...")
    distinct_n           unique n-grams (n = 2) over all answers / all n-grams of the answers (falls when
                         every answer becomes the same text)
    leaked_turn_share    share of answers holding a turn marker ("Human:" / "Assistant:" in the text, or a
                         chat template's role token among the tokens): the policy writes the next turn

All are plain Python over lists; `answer_measures` computes them under the keys stage 3 records. Stage 3's
held-out evaluation also records the two simplest measures, from the masks: the share of answers ending with
EOS within the length budget (`eos_fraction`; falls when the policy learns to ramble until it is cut off) and
the mean answer length in tokens, EOS included (`response_length`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

TURN_MARKERS = ("Human:", "Assistant:")
REPEAT_N, DISTINCT_N = 3, 2


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_rate(answers: Sequence[Sequence[int]], n: int = REPEAT_N) -> float:
    """Over all answers pooled: n-grams equal to an earlier n-gram of the same answer / all n-grams.

    [1, 2, 3, 1, 2, 3] has the trigrams 123 231 312 123; the last repeats the first: 1/4. Answers shorter
    than n have no n-grams; 0.0 when no answer has any."""
    repeated = total = 0
    for tokens in answers:
        grams = _ngrams(tokens, n)
        repeated += len(grams) - len(set(grams))
        total += len(grams)
    return repeated / total if total else 0.0


def distinct_n(answers: Sequence[Sequence[int]], n: int = DISTINCT_N) -> float:
    """Unique n-grams over the whole set / all n-grams of the set (1.0: no n-gram occurs twice anywhere).

    [[1, 2, 3], [1, 2]] has the bigrams 12 23 12: 2 unique of 3. 0.0 when no answer has an n-gram."""
    grams = [g for tokens in answers for g in _ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def leaked_turn_share(
    texts: Sequence[str],
    answers: Sequence[Sequence[int]],
    role_token_ids: Collection[int] = (),
    markers: Sequence[str] = TURN_MARKERS,
) -> float:
    """Share of answers whose text (decoded without special tokens) contains a turn marker or whose tokens
    include one of `role_token_ids` (a chat template's role tokens, e.g. <|im_start|>)."""
    if len(texts) != len(answers):
        raise ValueError(f"leaked_turn_share: {len(texts)} texts but {len(answers)} token lists")
    roles = set(role_token_ids)
    leaked = sum(
        any(m in text for m in markers) or any(t in roles for t in tokens)
        for text, tokens in zip(texts, answers, strict=True)
    )
    return leaked / len(texts) if texts else 0.0


def answer_measures(
    texts: Sequence[str],
    answers: Sequence[Sequence[int]],
    role_token_ids: Collection[int] = (),
) -> dict[str, float]:
    """Every measure above for one set of answers, under the keys of stage 3's ppo_metrics.json evals.
    `answers`: token ids without the final EOS; `texts`: the same decoded without special tokens."""
    return {
        f"repeated_{REPEAT_N}gram_rate": repeated_ngram_rate(answers, REPEAT_N),
        f"distinct_{DISTINCT_N}": distinct_n(answers, DISTINCT_N),
        "leaked_turn_markers": leaked_turn_share(texts, answers, role_token_ids),
    }
