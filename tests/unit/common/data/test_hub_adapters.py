"""Each Hub adapter's row mapping on a hand-written row in that dataset's native schema (no download)."""

from __future__ import annotations

import pytest

from common.data.hub_adapters import HUB_ADAPTERS
from common.data.rows import DataError, RowTally
from common.data.sources import convert_native_rows

PEERS_LIST = [
    "Dahoas/rm-static",
    "Dahoas/full-hh-rlhf",
    "Dahoas/synthetic-instruct-gptj-pairwise",
    "yitingxie/rlhf-reward-datasets",
    "openai/webgpt_comparisons",
    "stanfordnlp/SHP",
    "pvduy/sharegpt_alpaca_oa_vicuna_format",
    "wangrui6/Zhihu-KOL",
    "Cohere/miracl-zh-queries-22-12",
    "Hello-SimpleAI/HC3-Chinese",
    "mkqa-Chinese",
    "mkqa-Japanese",
    "Cohere/miracl-ja-queries-22-12",
    "lmqg/qg_jaquad",
    "lmqg/qag_jaquad",
]

# name -> (native row, expected (prompt, chosen, rejected))
CASES = {
    "Dahoas/rm-static": (
        {
            "prompt": "\n\nHuman: Hi?\n\nAssistant:",
            "response": " Hello.",
            "chosen": " Hello.",
            "rejected": " Go away.",
        },
        ("\n\nHuman: Hi?\n\nAssistant:", " Hello.", " Go away."),
    ),
    "Dahoas/full-hh-rlhf": (
        {"prompt": "\n\nHuman: A?\n\nAssistant:", "response": " B.", "chosen": " B.", "rejected": " C."},
        ("\n\nHuman: A?\n\nAssistant:", " B.", " C."),
    ),
    "Dahoas/synthetic-instruct-gptj-pairwise": (
        {
            "prompt": "How do I boil an egg?",
            "chosen": "Put it in boiling water.",
            "rejected": "Eggs are bad.",
        },
        ("\n\nHuman: How do I boil an egg?\n\nAssistant:", " Put it in boiling water.", " Eggs are bad."),
    ),
    "yitingxie/rlhf-reward-datasets": (
        {
            "prompt": "\n\nHuman: Why is the sky blue?\n\n",
            "chosen": "Assistant: Rayleigh scattering.",
            "rejected": "Assistant: Because it is.",
        },
        ("\n\nHuman: Why is the sky blue?\n\nAssistant:", " Rayleigh scattering.", " Because it is."),
    ),
    "openai/webgpt_comparisons": (
        {
            "question": {"dataset": "eli5", "id": "x", "full_text": "Why do cats purr?"},
            "quotes_0": {"title": [], "extract": []},
            "answer_0": "Cats purr when content [1].",
            "tokens_0": [],
            "score_0": -1.0,
            "quotes_1": {"title": [], "extract": []},
            "answer_1": "Purring is a vibration of the larynx (2) muscles.",
            "tokens_1": [],
            "score_1": 1.0,
        },
        (
            "\n\nHuman: Why do cats purr?\n\nAssistant:",
            " Purring is a vibration of the larynx muscles.",
            " Cats purr when content.",
        ),
    ),
    "stanfordnlp/SHP": (
        {
            "post_id": "p",
            "domain": "askscience",
            "upvote_ratio": 0.9,
            "history": "Why is ice slippery?",
            "c_root_id_A": "a",
            "c_root_id_B": "b",
            "created_at_utc_A": 1,
            "created_at_utc_B": 2,
            "score_A": 10,
            "score_B": 50,
            "human_ref_A": "It is wet.",
            "human_ref_B": "A thin liquid layer forms on its surface.",
            "labels": 0,
            "seconds_difference": 1.0,
            "score_ratio": 5.0,
        },
        (
            "\n\nHuman: Why is ice slippery?\n\nAssistant:",
            " A thin liquid layer forms on its surface.",
            " It is wet.",
        ),
    ),
    "pvduy/sharegpt_alpaca_oa_vicuna_format": (
        {"prompt": "USER: Hi ASSISTANT: Hello!</s>USER: Name a colour. ASSISTANT:", "label": "Blue.</s>"},
        ("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:", " Blue.", None),
    ),
    "wangrui6/Zhihu-KOL": (
        {"INSTRUCTION": "如何学习?", "RESPONSE": "多读书。", "SOURCE": "Zhihu", "METADATA": "{}"},
        ("\n\nHuman: 如何学习?\n\nAssistant:", " 多读书。", None),
    ),
    "Cohere/miracl-zh-queries-22-12": (
        {
            "query_id": "1",
            "query": "北京在哪里?",
            "positive_passages": [{"docid": "a", "text": "北京在中国北方。", "title": "北京"}],
            "negative_passages": [{"docid": "b", "text": "上海是港口城市。", "title": "上海"}],
        },
        ("\n\nHuman: 北京在哪里?\n\nAssistant:", " 北京在中国北方。", " 上海是港口城市。"),
    ),
    "Hello-SimpleAI/HC3-Chinese": (
        {
            "id": "0",
            "question": "什么是猫?",
            "human_answers": ["一种动物。"],
            "chatgpt_answers": ["猫是哺乳动物。"],
        },
        ("\n\nHuman: 什么是猫?\n\nAssistant:", " 一种动物。", None),
    ),
    "mkqa-Chinese": (
        {
            "example_id": 1,
            "query": "how tall is everest",
            "queries": {"en": "how tall is everest", "zh_cn": "珠峰多高", "ja": "エベレストの高さ"},
            "answers": {
                "zh_cn": [{"type": 5, "entity": "", "text": "8848米", "aliases": []}],
                "ja": [{"type": 5, "entity": "", "text": "8848メートル", "aliases": []}],
            },
        },
        ("\n\nHuman: 珠峰多高\n\nAssistant:", " 8848米", None),
    ),
    "Cohere/miracl-ja-queries-22-12": (
        {
            "query_id": "2",
            "query": "東京の人口は?",
            "positive_passages": [{"docid": "a", "text": "約1400万人。", "title": "東京"}],
            "negative_passages": [],
        },
        ("\n\nHuman: 東京の人口は?\n\nAssistant:", " 約1400万人。", None),
    ),
    "lmqg/qg_jaquad": (
        {
            "answer": "富士山",
            "paragraph_question": "...",
            "question": "日本一高い山は?",
            "sentence": "日本一高い山は富士山である。",
            "paragraph": "富士山は...",
            "sentence_answer": "...",
            "paragraph_answer": "...",
            "paragraph_sentence": "...",
            "paragraph_id": "x",
        },
        ("\n\nHuman: 日本一高い山は?\n\nAssistant:", " 日本一高い山は富士山である。", None),
    ),
    "lmqg/qag_jaquad": (
        {
            "answers": ["富士山", "静岡"],
            "questions": ["日本一高い山は?", "どこにある?"],
            "paragraph": "富士山は静岡と山梨にある。",
            "questions_answers": "...",
        },
        ("\n\nHuman: 日本一高い山は?\n\nAssistant:", " 富士山は静岡と山梨にある。", None),
    ),
    "Anthropic/hh-rlhf": (
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: Sure, with what?",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: No.",
        },
        ("\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant:", " Sure, with what?", " No."),
    ),
}
CASES["mkqa-Japanese"] = (
    CASES["mkqa-Chinese"][0],
    ("\n\nHuman: エベレストの高さ\n\nAssistant:", " 8848メートル", None),
)


def test_every_peer_dataset_and_hh_rlhf_has_an_adapter_and_a_case():
    assert set(HUB_ADAPTERS) == set(PEERS_LIST) | {"Anthropic/hh-rlhf"}
    assert set(CASES) == set(HUB_ADAPTERS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapter_maps_native_row(name):
    native, expected = CASES[name]
    adapter = HUB_ADAPTERS[name]
    assert adapter.to_texts(native) == expected
    rows = convert_native_rows(adapter, [native], "train", RowTally(name, skip_bad_rows=False))
    assert [(r.prompt, r.chosen, r.rejected) for r in rows] == [expected]
    assert adapter.pairwise == (expected[2] is not None or name.startswith("Cohere/miracl"))


def test_webgpt_ties_and_shp_label_order():
    native = dict(CASES["openai/webgpt_comparisons"][0])
    native["score_0"], native["score_1"] = 1.0, -1.0  # now answer_0 wins
    assert HUB_ADAPTERS["openai/webgpt_comparisons"].to_texts(native)[1] == " Cats purr when content."
    native["score_1"] = 1.0
    tally = RowTally("webgpt", skip_bad_rows=False)
    assert convert_native_rows(HUB_ADAPTERS["openai/webgpt_comparisons"], [native], "train", tally) == []
    assert tally.filtered == {"tied scores: no preference": 1}

    shp = dict(CASES["stanfordnlp/SHP"][0], labels=1)
    assert HUB_ADAPTERS["stanfordnlp/SHP"].to_texts(shp)[1:] == (
        " It is wet.",
        " A thin liquid layer forms on its surface.",
    )


def test_mkqa_question_without_answer_is_filtered_and_counted():
    native = dict(CASES["mkqa-Chinese"][0])
    native["answers"] = {"zh_cn": [{"type": 6, "entity": "", "text": None, "aliases": []}]}
    tally = RowTally("mkqa-Chinese", skip_bad_rows=False)
    assert convert_native_rows(HUB_ADAPTERS["mkqa-Chinese"], [native], "train", tally) == []
    assert tally.filtered == {"question without an answer text": 1}


def test_malformed_native_rows_raise_with_dataset_row_and_column():
    native = dict(CASES["Dahoas/rm-static"][0])
    del native["rejected"]
    bad_hh = {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: C\n\nAssistant: D"}
    with pytest.raises(
        DataError, match=r"Dahoas/rm-static split 'train' row index 1, column 'rejected': missing"
    ):
        convert_native_rows(HUB_ADAPTERS["Dahoas/rm-static"], [CASES["Dahoas/rm-static"][0], native], "train",
                            RowTally("x", False))  # fmt: skip
    with pytest.raises(DataError, match="different conversation prefixes"):
        convert_native_rows(HUB_ADAPTERS["Anthropic/hh-rlhf"], [bad_hh], "test", RowTally("x", False))
    empty_pos = dict(CASES["Cohere/miracl-zh-queries-22-12"][0], positive_passages=[])
    with pytest.raises(DataError, match="column 'positive_passages.0'"):
        convert_native_rows(
            HUB_ADAPTERS["Cohere/miracl-zh-queries-22-12"], [empty_pos], "train", RowTally("x", False)
        )
    tally = RowTally("x", skip_bad_rows=True)
    assert convert_native_rows(HUB_ADAPTERS["Dahoas/rm-static"], [native, native], "train", tally) == []
    assert tally.bad == 2


def test_hub_splits_match_deepspeed_chat():
    no_test_split = {name for name, a in HUB_ADAPTERS.items() if a.eval_split is None}
    assert no_test_split == {
        "Dahoas/synthetic-instruct-gptj-pairwise",
        "openai/webgpt_comparisons",
        "wangrui6/Zhihu-KOL",
        "Hello-SimpleAI/HC3-Chinese",
        "mkqa-Chinese",
        "mkqa-Japanese",
    }
