"""The reward-hacking measures of common/evaluation/text_metrics.py against hand-computed values."""

from __future__ import annotations

import pytest

from common.evaluation.text_metrics import answer_measures, distinct_n, leaked_turn_share, repeated_ngram_rate


def test_repeated_ngram_rate_counts_repeats_of_earlier_ngrams_in_the_same_answer():
    # trigrams 123 231 312 123: the last repeats the first -> 1 of 4
    assert repeated_ngram_rate([[1, 2, 3, 1, 2, 3]]) == pytest.approx(1 / 4)
    # a loop of one token: 5 trigrams 777, 4 repeat the first
    assert repeated_ngram_rate([[7] * 7]) == pytest.approx(4 / 5)
    # pooled over answers: [1,2,3,1,2,3] has 1 repeat of 4; [1,2,3] has 0 of 1 (the same trigram in another
    # answer is not a repeat); [4] has none -> 1 / 5
    assert repeated_ngram_rate([[1, 2, 3, 1, 2, 3], [1, 2, 3], [4]]) == pytest.approx(1 / 5)
    assert repeated_ngram_rate([[1, 2, 1, 2]], n=2) == pytest.approx(1 / 3)  # bigrams 12 21 12
    assert repeated_ngram_rate([[1, 2], []]) == 0.0  # no trigram at all


def test_distinct_n_is_unique_over_all_ngrams_of_the_set():
    assert distinct_n([[1, 2, 3], [1, 2]]) == pytest.approx(2 / 3)  # bigrams 12 23 12
    assert distinct_n([[1, 2, 3, 4]]) == 1.0
    assert distinct_n([[5, 5, 5], [5, 5]]) == pytest.approx(1 / 3)  # 55 55 55: one unique
    assert distinct_n([[1, 2, 3], [2, 3, 1]], n=3) == 1.0  # trigrams 123 231
    assert distinct_n([[1], []]) == 0.0


def test_leaked_turn_share_sees_text_markers_and_role_tokens():
    texts = [" Sure, here you go.", " Fine.\n\nHuman: and then?", " Assistant: again", " ok"]
    tokens = [[10, 11], [12, 13], [14], [15, 99]]
    assert leaked_turn_share(texts, tokens) == pytest.approx(2 / 4)
    assert leaked_turn_share(texts, tokens, role_token_ids={99}) == pytest.approx(3 / 4)
    assert leaked_turn_share(texts, tokens, markers=("here",)) == pytest.approx(1 / 4)
    assert leaked_turn_share([], []) == 0.0
    with pytest.raises(ValueError, match="2 texts but 1 token lists"):
        leaked_turn_share(["a", "b"], [[1]])


def test_answer_measures_keys_and_values():
    texts = [" a b a b", " Human: hi"]
    tokens = [[1, 2, 1, 2, 1], [3, 4]]
    # trigrams of answer 1: 121 212 121 -> 1 repeat of 3; bigrams 12 21 12 21 34 -> 3 unique of 5
    assert answer_measures(texts, tokens) == pytest.approx(
        {"repeated_3gram_rate": 1 / 3, "distinct_2": 3 / 5, "leaked_turn_markers": 1 / 2}
    )
