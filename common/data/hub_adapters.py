"""Adapters for the Hugging Face Hub datasets DeepSpeed-Chat reads, keyed by the name used in `data_path`.

Each adapter says where the dataset lives (`hf_path`, `config`), which splits are train and eval (eval None:
the pipeline splits train 9:1 itself) and how one native row maps to the pipeline's schema:
prompt "\\n\\nHuman: <question>\\n\\nAssistant:", chosen " <answer>", rejected " <answer>" or None.
The mapping functions are pure (dict in, texts out) and are tested on hand-written native rows; only
`common.data.sources` calls `datasets.load_dataset`.

A mapping function raises RowError for a malformed row (missing key, wrong type, empty text) and
RowFiltered for a row the dataset legitimately cannot use (tied comparison, question without an answer);
the loader counts both and never drops a row silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.data.rows import RowError, RowFiltered, check_text

Texts = tuple[str, str, str | None]  # (prompt, chosen, rejected)
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclass(frozen=True)
class HubAdapter:
    name: str  # the key users put in data_path
    hf_path: str  # what datasets.load_dataset is called with
    config: str | None
    train_split: str
    eval_split: str | None  # None: no eval split on the Hub, split train 9:1
    to_texts: Callable[[dict[str, Any]], Texts]
    pairwise: bool  # whether rows carry a rejected response (usable by stage 2)


def human_prompt(question: str) -> str:
    return f"{HUMAN} {question}{ASSISTANT}"


def reply(answer: str) -> str:
    return " " + answer


def field(row: dict[str, Any], *keys: str | int) -> Any:
    """row[k1][k2]... with a RowError naming the path when a key or index is missing."""
    value: Any = row
    for i, key in enumerate(keys):
        path = ".".join(str(k) for k in keys[: i + 1])
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            raise RowError(path, "missing column" if i == 0 else "missing field or empty list") from None
    return value


def text(row: dict[str, Any], *keys: str | int) -> str:
    return check_text(field(row, *keys), ".".join(str(k) for k in keys))


# ---- English -------------------------------------------------------------------------------------------


def rm_static_texts(row: dict[str, Any]) -> Texts:
    """Dahoas/rm-static and Dahoas/full-hh-rlhf: already in the pipeline's convention."""
    return text(row, "prompt"), text(row, "chosen"), text(row, "rejected")


def synthetic_gptj_texts(row: dict[str, Any]) -> Texts:
    """Dahoas/synthetic-instruct-gptj-pairwise: {prompt, chosen, rejected} without the Human/Assistant frame."""
    return human_prompt(text(row, "prompt")), reply(text(row, "chosen")), reply(text(row, "rejected"))


def yitingxie_texts(row: dict[str, Any]) -> Texts:
    """yitingxie/rlhf-reward-datasets: prompt ends before "Assistant:", responses start with "Assistant:"."""
    prompt = text(row, "prompt").rstrip(" ")
    chosen = text(row, "chosen").removeprefix("Assistant:")
    rejected = text(row, "rejected").removeprefix("Assistant:")
    return prompt + "Assistant:", chosen, rejected


_CITATION = (re.compile(r" [\(\[].*?[\)\]]"), re.compile(r"[\(\[].*?[\)\]]"))


def _strip_citations(answer: str) -> str:
    # WebGPT answers cite their browsing results ("[1]", "(2)"); without browsing they only confuse the model.
    for pattern in _CITATION:
        answer = pattern.sub("", answer)
    return answer


def webgpt_texts(row: dict[str, Any]) -> Texts:
    """openai/webgpt_comparisons: two answers with scores; ties carry no preference and are filtered."""
    question = text(row, "question", "full_text")
    scores = []
    for key in ("score_0", "score_1"):
        try:
            scores.append(float(field(row, key)))
        except (TypeError, ValueError):
            raise RowError(key, f"expected a number, got {field(row, key)!r}") from None
    if scores[0] == scores[1]:
        raise RowFiltered("tied scores: no preference")
    better, worse = ("answer_0", "answer_1") if scores[0] > scores[1] else ("answer_1", "answer_0")
    chosen = check_text(_strip_citations(text(row, better)), better)
    rejected = check_text(_strip_citations(text(row, worse)), worse)
    return human_prompt(question), reply(chosen), reply(rejected)


def shp_texts(row: dict[str, Any]) -> Texts:
    """stanfordnlp/SHP: labels == 1 means human_ref_A is preferred."""
    label = field(row, "labels")
    if label not in (0, 1):
        raise RowError("labels", f"expected 0 or 1, got {label!r}")
    a, b = text(row, "human_ref_A"), text(row, "human_ref_B")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return human_prompt(text(row, "history")), reply(chosen), reply(rejected)


def sharegpt_vicuna_texts(row: dict[str, Any]) -> Texts:
    """pvduy/sharegpt_alpaca_oa_vicuna_format: "USER: ... ASSISTANT:" prompts, `label` answer, SFT only."""
    prompt = text(row, "prompt").replace("</s>", "")  # Vicuna turn separators: EOS written as text
    prompt = re.sub(r"\s*USER:\s*", HUMAN + " ", prompt)
    prompt = re.sub(r"\s*ASSISTANT:\s*", ASSISTANT + " ", prompt).rstrip()
    chosen = check_text(text(row, "label").replace("</s>", ""), "label")
    return prompt, reply(chosen.strip()), None


def hh_rlhf_texts(row: dict[str, Any]) -> Texts:
    """Anthropic/hh-rlhf: whole transcripts; the prompt is everything up to the last "\\n\\nAssistant:"."""

    def split(column: str) -> tuple[str, str]:
        transcript = text(row, column)
        cut = transcript.rfind(ASSISTANT)
        if cut < 0:
            raise RowError(column, 'no "\\n\\nAssistant:" turn in the transcript')
        cut += len(ASSISTANT)
        return transcript[:cut], check_text(transcript[cut:], column)

    prompt, chosen = split("chosen")
    rejected_prompt, rejected = split("rejected")
    if rejected_prompt != prompt:
        raise RowError("rejected", "chosen and rejected transcripts have different conversation prefixes")
    return prompt, chosen, rejected


# ---- Chinese and Japanese ------------------------------------------------------------------------------


def zhihu_texts(row: dict[str, Any]) -> Texts:
    """wangrui6/Zhihu-KOL: {INSTRUCTION, RESPONSE}, SFT only."""
    return human_prompt(text(row, "INSTRUCTION")), reply(text(row, "RESPONSE")), None


def miracl_texts(row: dict[str, Any]) -> Texts:
    """Cohere/miracl-*-queries-22-12: first positive passage chosen, first negative (if any) rejected."""
    chosen = text(row, "positive_passages", 0, "text")
    negatives = field(row, "negative_passages")
    rejected = text(row, "negative_passages", 0, "text") if negatives else None
    return human_prompt(text(row, "query")), reply(chosen), None if rejected is None else reply(rejected)


def hc3_chinese_texts(row: dict[str, Any]) -> Texts:
    """Hello-SimpleAI/HC3-Chinese: the first human answer, SFT only."""
    return human_prompt(text(row, "question")), reply(text(row, "human_answers", 0)), None


def mkqa_texts(lang: str) -> Callable[[dict[str, Any]], Texts]:
    """apple/mkqa (DeepSpeed-Chat's "mkqa-Chinese"/"mkqa-Japanese"): queries[lang], answers[lang][0].text."""

    def to_texts(row: dict[str, Any]) -> Texts:
        answer = field(row, "answers", lang, 0)
        if not isinstance(answer, dict) or not answer.get("text"):
            raise RowFiltered("question without an answer text")
        chosen = check_text(answer["text"], f"answers.{lang}.0.text")
        return human_prompt(text(row, "queries", lang)), reply(chosen), None

    return to_texts


def qg_jaquad_texts(row: dict[str, Any]) -> Texts:
    """lmqg/qg_jaquad: question -> the sentence holding its answer, SFT only."""
    return human_prompt(text(row, "question")), reply(text(row, "sentence")), None


def qag_jaquad_texts(row: dict[str, Any]) -> Texts:
    """lmqg/qag_jaquad: first question -> its paragraph, SFT only."""
    return human_prompt(text(row, "questions", 0)), reply(text(row, "paragraph")), None


HUB_ADAPTERS: dict[str, HubAdapter] = {
    a.name: a
    for a in [
        HubAdapter("Dahoas/rm-static", "Dahoas/rm-static", None, "train", "test", rm_static_texts, True),
        HubAdapter(
            "Dahoas/full-hh-rlhf", "Dahoas/full-hh-rlhf", None, "train", "test", rm_static_texts, True
        ),
        HubAdapter(
            "Dahoas/synthetic-instruct-gptj-pairwise",
            "Dahoas/synthetic-instruct-gptj-pairwise",
            None,
            "train",
            None,
            synthetic_gptj_texts,
            True,
        ),
        HubAdapter(
            "yitingxie/rlhf-reward-datasets",
            "yitingxie/rlhf-reward-datasets",
            None,
            "train",
            "test",
            yitingxie_texts,
            True,
        ),
        HubAdapter(
            "openai/webgpt_comparisons", "openai/webgpt_comparisons", None, "train", None, webgpt_texts, True
        ),
        HubAdapter("stanfordnlp/SHP", "stanfordnlp/SHP", None, "train", "validation", shp_texts, True),
        HubAdapter(
            "pvduy/sharegpt_alpaca_oa_vicuna_format",
            "pvduy/sharegpt_alpaca_oa_vicuna_format",
            None,
            "train",
            "test",
            sharegpt_vicuna_texts,
            False,
        ),
        HubAdapter("wangrui6/Zhihu-KOL", "wangrui6/Zhihu-KOL", None, "train", None, zhihu_texts, False),
        HubAdapter(
            "Cohere/miracl-zh-queries-22-12",
            "Cohere/miracl-zh-queries-22-12",
            None,
            "train",
            "dev",
            miracl_texts,
            True,
        ),
        HubAdapter(
            "Hello-SimpleAI/HC3-Chinese",
            "Hello-SimpleAI/HC3-Chinese",
            "all",
            "train",
            None,
            hc3_chinese_texts,
            False,
        ),
        HubAdapter("mkqa-Chinese", "apple/mkqa", None, "train", None, mkqa_texts("zh_cn"), False),
        HubAdapter("mkqa-Japanese", "apple/mkqa", None, "train", None, mkqa_texts("ja"), False),
        HubAdapter(
            "Cohere/miracl-ja-queries-22-12",
            "Cohere/miracl-ja-queries-22-12",
            None,
            "train",
            "dev",
            miracl_texts,
            True,
        ),
        HubAdapter("lmqg/qg_jaquad", "lmqg/qg_jaquad", None, "train", "validation", qg_jaquad_texts, False),
        HubAdapter(
            "lmqg/qag_jaquad", "lmqg/qag_jaquad", None, "train", "validation", qag_jaquad_texts, False
        ),
        HubAdapter("Anthropic/hh-rlhf", "Anthropic/hh-rlhf", None, "train", "test", hh_rlhf_texts, True),
    ]
}
