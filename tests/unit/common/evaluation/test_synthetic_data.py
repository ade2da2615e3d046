"""The bundled synthetic preference dataset: schema, reproducibility, level mix, learnability."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from common.evaluation.gold import gold_score, synthetic_gold

REPO = Path(__file__).resolve().parents[4]
DATA = REPO / "data" / "synthetic"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "data" / "make_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is created
    spec.loader.exec_module(module)
    return module


ms = _load_generator()


def _rows(split: str) -> list[dict]:
    with (DATA / f"{split}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {"train": _rows("train"), "test": _rows("test")}


def test_generator_reproduces_committed_files_byte_for_byte():
    generated = ms.generate()
    for split in ("train", "test"):
        assert ms.to_jsonl(generated[split]) == (DATA / f"{split}.jsonl").read_bytes(), split
    assert ms.generate() == generated


def test_cli_check_detects_a_modified_file(tmp_path, capsys):
    assert ms.main(["--out", str(tmp_path), "--n_train", "40", "--n_test", "10"]) == 0
    assert ms.main(["--out", str(tmp_path), "--n_train", "40", "--n_test", "10", "--check"]) == 0
    path = tmp_path / "test.jsonl"
    path.write_bytes(path.read_bytes().replace(b"Human", b"human", 1))
    assert ms.main(["--out", str(tmp_path), "--n_train", "40", "--n_test", "10", "--check"]) == 1
    assert "test.jsonl" in capsys.readouterr().err


def test_sizes(rows):
    assert len(rows["train"]) == ms.DEFAULT_N_TRAIN == 3000
    assert len(rows["test"]) == ms.DEFAULT_N_TEST == 300
    total = sum(p.stat().st_size for p in DATA.glob("*.jsonl"))
    assert total < 2_000_000


@pytest.mark.parametrize("split", ["train", "test"])
def test_schema_and_prompt_format(rows, split):
    for i, row in enumerate(rows[split]):
        where = f"{split} row {i}"
        assert list(row) == list(ms.FIELDS), where
        assert all(isinstance(row[k], str) and row[k] for k in ms.FIELDS), where
        assert row["response"] == row["chosen"], where
        assert row["chosen"] != row["rejected"], where
        prompt = row["prompt"]
        assert prompt.startswith("\n\nHuman: ") and prompt.endswith("\n\nAssistant:"), where
        # Turns alternate Human / Assistant and every turn has text.
        turns = prompt.split("\n\n")[1:]
        assert [t.split(":")[0] for t in turns] == ["Human", "Assistant"] * (len(turns) // 2), where
        assert all(t.split(":", 1)[1].strip() for t in turns[:-1]), where
        for side in ("chosen", "rejected"):
            text = row[side]
            assert text.startswith(" ") and not text.startswith("  ") and text == text.rstrip(), where
            if ms.response_level(prompt, text) != ms.MALFORMED:  # well-formed: one line of 8-30 words
                assert "\n" not in text, where
                assert 8 <= len(text.split()) <= 30, (where, text)
            else:  # malformed on purpose (only `rejected`): a truncated answer may be one word
                assert side == "rejected" and 1 <= len(text.split()) <= 60, (where, text)


def test_multi_turn_prompts_present(rows):
    for split, split_rows in rows.items():
        share = sum(r["prompt"].count("\n\nHuman: ") > 1 for r in split_rows) / len(split_rows)
        assert abs(share - ms.MULTI_TURN_SHARE) < 0.04, (split, share)


def test_test_prompts_are_held_out(rows):
    train_questions = {ms.last_question(r["prompt"]) for r in rows["train"]}
    test_questions = {ms.last_question(r["prompt"]) for r in rows["test"]}
    assert not train_questions & test_questions
    # Every topic is asked about in both splits, with varied phrasing.
    for split_rows in rows.values():
        assert {ms.prompt_topic(r["prompt"]) for r in split_rows} == set(range(len(ms.TOPICS)))
    assert len({r["prompt"] for r in rows["train"]}) > 1000


@pytest.mark.parametrize("split", ["train", "test"])
def test_level_mix_as_designed(rows, split):
    split_rows = rows[split]
    pairs = Counter(
        (ms.response_level(r["prompt"], r["chosen"]), ms.response_level(r["prompt"], r["rejected"]))
        for r in split_rows
    )
    assert dict(pairs) == ms.pair_counts(len(split_rows))
    assert set(pairs) == set(ms.PAIR_MIX)  # chosen well-formed, ranked best > mediocre > bad > malformed
    best_chosen = sum(n for (c, _), n in pairs.items() if c == ms.BEST) / len(split_rows)
    assert best_chosen == pytest.approx(0.40, abs=0.005)  # SFT on `chosen` sees best in 40% of rows
    malformed = sum(n for (_, r), n in pairs.items() if r == ms.MALFORMED) / len(split_rows)
    assert malformed == pytest.approx(0.60, abs=0.005)


@pytest.mark.parametrize("split", ["train", "test"])
def test_gold_ranks_chosen_above_rejected(rows, split):
    split_rows = rows[split]
    prompts = [r["prompt"] for r in split_rows]
    chosen = synthetic_gold(prompts, [r["chosen"] for r in split_rows], [True] * len(split_rows))
    rejected = synthetic_gold(prompts, [r["rejected"] for r in split_rows], [True] * len(split_rows))
    for i, (c, r) in enumerate(zip(chosen, rejected, strict=True)):
        assert c.score > r.score and c.label != "malformed", (split, i, c, r)


def test_malformed_styles():
    """Each malformed style makes text the gold calls malformed, of the kind its name says."""
    rice = next(i for i, t in enumerate(ms.TOPICS) if t.thing == "rice")
    prompt = "\n\nHuman: How do I cook rice?\n\nAssistant:"
    others = {tip for i, t in enumerate(ms.TOPICS) if i != rice for tip in t.tips}
    well_formed = [f" {o} {t} {c}" for o in ms.OPENERS for t in ms.TOPICS[rice].tips for c in ms.CLOSERS]
    all_tips = others | set(ms.TOPICS[rice].tips)

    def framed(text: str) -> bool:  # opener + one sentence + closer
        return any(text.startswith(f" {o} ") for o in ms.OPENERS) and any(
            text.endswith(f" {c}") for c in ms.CLOSERS
        )

    well_formed += [f" {t}" for t in ms.TOPICS[rice].tips] + [
        f" {o} {g}" for o in ms.OPENERS for g in ms.GENERIC
    ]
    checks = {
        "stacked_closers": lambda t: sum(t.count(c) for c in ms.CLOSERS) >= 2,
        "word_salad": lambda t: (
            any(t.startswith(f" {o} ") for o in ms.OPENERS)
            and not any(tip in t for tip in ms.TOPICS[rice].tips)
        ),
        "truncated": lambda t: any(full.startswith(t + " ") for full in well_formed),
        "second_turn": lambda t: "\n\nHuman: " in t,
        "off_topic_tip": lambda t: any(tip in t for tip in others) and "rather" not in t,
        "spliced_tip": lambda t: framed(t) and not any(tip in t for tip in all_tips),
        "garbled_tip": lambda t: framed(t) and not any(tip in t for tip in all_tips),
    }
    assert set(checks) == {style for style, _ in ms.MALFORMED_STYLES}
    rng = random.Random(0)
    for style, check in checks.items():
        for _ in range(40):
            text = ms._malformed(style, rice, rng)
            assert gold_score(prompt, text, True).label == "malformed", (style, text)
            assert check(text), (style, text)


def test_wrong_tip_twin_changes_only_the_content():
    """The twin keeps the answer's opener and closer, swaps its one tip or generic sentence for another
    topic's tip, a spliced tip or a garbled one (all three occur), and the gold ranks it malformed."""
    rice = next(i for i, t in enumerate(ms.TOPICS) if t.thing == "rice")
    prompt = "\n\nHuman: How do I cook rice?\n\nAssistant:"
    others = {tip for i, t in enumerate(ms.TOPICS) if i != rice for tip in t.tips}
    rng = random.Random(0)
    kinds = Counter()
    for answer in (
        f" Of course! {ms.TOPICS[rice].tips[0]} Good luck!",  # best
        f" {ms.TOPICS[rice].tips[1]}",  # curt
        f" Happy to help! {ms.GENERIC[2]}",  # vague
    ):
        content = next(s for s in (*ms.TOPICS[rice].tips, *ms.GENERIC) if s in answer)
        head, tail = answer.split(content)
        for _ in range(30):
            twin = ms.wrong_tip_twin(answer, rice, rng)
            assert twin.startswith(head) and twin.endswith(tail), (answer, twin)
            middle = twin[len(head) : len(twin) - len(tail)]
            assert middle != content and middle.endswith(".")
            kinds["off_topic" if middle in others else "spliced_or_garbled"] += 1
            assert gold_score(prompt, twin, True).label == "malformed", twin
            assert gold_score(prompt, twin, True).score < gold_score(prompt, answer, True).score
    assert kinds["off_topic"] > 10 and kinds["spliced_or_garbled"] > 20
    with pytest.raises(ValueError, match="expected one tip or generic sentence"):
        ms.wrong_tip_twin(" Good luck!", rice, rng)


def test_pair_counts_exact():
    for n in (1, 7, 300, 3000, 3001):
        counts = ms.pair_counts(n)
        assert sum(counts.values()) == n
        for pair, share in ms.PAIR_MIX.items():
            assert abs(counts[pair] - share * n) <= 1


def test_styles_within_levels(rows):
    """Both mediocre styles and all three bad styles occur in roughly the designed shares."""
    mediocre, bad = Counter(), Counter()
    for r in rows["train"]:
        for text in (r["chosen"], r["rejected"]):
            level = ms.response_level(r["prompt"], text)
            if level == ms.MEDIOCRE:
                curt = any(text == f" {tip}" for tip in ms.TOPICS[ms.prompt_topic(r["prompt"])].tips)
                mediocre["curt" if curt else "vague"] += 1
            elif level == ms.BAD:
                if text.startswith(" I would rather talk about"):
                    bad["off_topic"] += 1
                else:
                    bad["rude" if text.strip() in ms.RUDE else "refusal"] += 1
    for counts, styles in ((mediocre, ms.MEDIOCRE_STYLES), (bad, ms.BAD_STYLES)):
        total = sum(counts.values())
        for style, share in styles:
            # sampled per answer: within 4 standard errors (bad answers are rarer now: ~450 in train)
            assert abs(counts[style] / total - share) < 4 * math.sqrt(share * (1 - share) / total), (
                style,
                counts,
            )


def test_response_level_oracle():
    prompt = "\n\nHuman: Hi! How do I cook rice?\n\nAssistant:"
    tip = ms.TOPICS[ms.prompt_topic(prompt)].tips[0]
    assert tip.startswith("Rinse the rice")
    assert ms.response_level(prompt, f" Good luck! {tip}") == ms.UNRECOGNISED  # closer in the wrong place
    assert ms.response_level(prompt, f" Of course! {tip} Good luck!") == ms.BEST
    assert ms.response_level(prompt, f"Of course! {tip} Good luck!\n") == ms.BEST  # whitespace is ignored
    assert ms.response_level(prompt, f" {tip}") == ms.MEDIOCRE
    assert ms.response_level(prompt, f" Of course! {ms.GENERIC[1]}") == ms.MEDIOCRE
    assert ms.response_level(prompt, f" Of course! {tip} Good luck! Good luck!") == ms.UNRECOGNISED
    assert ms.response_level(prompt, f" {ms.RUDE[0]}") == ms.BAD
    assert ms.response_level(prompt, f" {ms.REFUSALS[0]}") == ms.BAD
    tea = next(t for t in ms.TOPICS if t.thing == "tea")
    rice = next(t for t in ms.TOPICS if t.thing == "rice")
    assert ms.response_level(prompt, f" I would rather talk about tea. {tea.tips[1]}") == ms.BAD
    # The right topic under an off-topic frame, or another topic's tip dressed up as best, is no level.
    assert ms.response_level(prompt, f" I would rather talk about rice. {rice.tips[1]}") == ms.UNRECOGNISED
    assert ms.response_level(prompt, f" Of course! {tea.tips[0]} Good luck!") == ms.UNRECOGNISED
    # The topic comes from the last Human turn only.
    multi = f"\n\nHuman: How do I make a cup of tea?\n\nAssistant: Of course! {tea.tips[0]}\n\nHuman: {prompt[9:]}"
    assert ms.response_level(multi, f" {tip}") == ms.MEDIOCRE
    with pytest.raises(ValueError, match="rm-static"):
        ms.response_level("How do I cook rice?", f" {tip}")
    with pytest.raises(ValueError, match="topic"):
        ms.response_level("\n\nHuman: How do I juggle?\n\nAssistant:", f" {tip}")


def _features(text: str) -> list[str]:
    """Words and word pairs of text, with start and end markers (a pair sees a stacked closer, a cut)."""
    for mark in ".,!?":
        text = text.replace(mark, f" {mark}")
    words = ["<s>", *text.lower().split(), "</s>"]
    return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]


def _bag_of_features(texts: list[str], vocab: dict[str, int]) -> torch.Tensor:
    x = torch.zeros(len(texts), len(vocab))
    for i, text in enumerate(texts):
        for feature in _features(text):
            if feature in vocab:
                x[i, vocab[feature]] += 1
    return x


@pytest.mark.slow
def test_preference_is_visible_in_response_tokens_except_the_topic(rows):
    """A linear reward on the response's words and word pairs ranks held-out pairs well above chance, but
    not an off-topic tip in polite framing against a good answer: that needs the prompt (a reward model
    reads it). (Before the malformed answers, on words alone and the three levels only: >= 0.9.)"""
    train, test = rows["train"], rows["test"]
    features = sorted({f for r in train for side in ("chosen", "rejected") for f in _features(r[side])})
    vocab = {f: i for i, f in enumerate(features)}
    diff = {
        split: _bag_of_features([r["chosen"] for r in split_rows], vocab)
        - _bag_of_features([r["rejected"] for r in split_rows], vocab)
        for split, split_rows in (("train", train), ("test", test))
    }
    w = torch.zeros(len(vocab), requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.1)
    for _ in range(60):
        loss = -torch.nn.functional.logsigmoid(diff["train"] @ w).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        correct = (diff["test"] @ w > 0).tolist()
    tips = {tip: i for i, topic in enumerate(ms.TOPICS) for tip in topic.tips}
    off_topic = [
        ms.response_level(r["prompt"], r["rejected"]) == ms.MALFORMED
        and any(tip in r["rejected"] and i != ms.prompt_topic(r["prompt"]) for tip, i in tips.items())
        for r in test
    ]
    on_topic_correct = [c for c, off in zip(correct, off_topic, strict=True) if not off]
    off_topic_correct = [c for c, off in zip(correct, off_topic, strict=True) if off]
    assert len(off_topic_correct) >= 20
    assert sum(on_topic_correct) / len(on_topic_correct) >= 0.8
    assert sum(off_topic_correct) / len(off_topic_correct) <= 0.6


@pytest.mark.slow
def test_answers_are_short_in_tiny_tokens(rows, tiny_tokenizer):
    """Well-formed answers fit a 48-token generation budget; every pair fits the 128 tokens of stages 1-2."""
    train = rows["train"]
    well_formed = [
        r[s] for r in train for s in ("chosen", "rejected") if ms.response_level(r["prompt"], r[s]) >= 0
    ]
    assert max(len(ids) for ids in tiny_tokenizer(well_formed).input_ids) + 1 <= 48  # + EOS
    for side in ("chosen", "rejected"):
        lengths = tiny_tokenizer([r["prompt"] + r[side] for r in train]).input_ids
        assert max(len(ids) for ids in lengths) + 1 <= 128, side
