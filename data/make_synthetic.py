"""Generate the bundled synthetic preference dataset (`data/synthetic/{train,test}.jsonl`).

Run from the repository root: `python data/make_synthetic.py` (defaults reproduce the committed files
byte for byte; `--check` verifies that instead of writing).

Schema (Dahoas/rm-static): every JSON line has `prompt` ("\\n\\nHuman: ...\\n\\nAssistant:"), `response`
(= `chosen`, as in rm-static), `chosen` and `rejected`. Responses start with a space, like rm-static.

Design: the data must let a tiny random-init model show learning in all three stages within minutes, and
let the reward model learn what the gold reward (`common/evaluation/gold.py`) prefers among the texts policies produce.

- Prompts: 40 everyday topics x 10 question templates, with an optional greeting prefix; 10% are
  multi-turn (an earlier small-talk exchange, or an earlier question on another topic answered well).
  One template per topic is held out for the test split, so test prompts are never seen in training.
- Three quality levels of well-formed answers (the grammar, `common/evaluation/synthetic_task.py`):
    best (2)     = polite opener + a tip specific to the prompt's topic + friendly closer
                   (" Happy to help! Let the dough rise until it doubles ... Good luck!")
    mediocre (1) = either curt (the on-topic tip alone, no opener/closer) or vague
                   (a polite opener followed by generic advice with no content)
    bad (0)      = rude, a flat refusal, or off-topic ("I would rather talk about <other topic>. <its tip>")
  and malformed answers (-1), made the ways a policy's samples go wrong (shares sampled per answer):
    stacked closers 20%  a best answer + 1-3 more closers, or a vague one + 2-3, often the same one again
    word salad      15%  a polite opener, then 6-14 words shuffled from the topic's tips and generic advice
    truncated       15%  a best or mediocre answer cut after a random word
    second turn     10%  a best or mediocre answer that goes on with "\n\nHuman: ..." (and maybe "Assistant:")
    off-topic tip   15%  another topic's tip in polite framing (opener + tip + closer)
    spliced tip     15%  opener + the start of one tip joined to the end of another + closer
    garbled tip     10%  opener + the topic's tip with a slip (1-3 words repeated, dropped or swapped) + closer
  (No "near misses" such as opener + tip without a closer: pairs that rank them below a curt tip alone blur
  the best > mediocre contrast, which is what PPO climbs, and an SFT policy rarely writes them.)
- Pairs (chosen, rejected), exact counts: (best, mediocre) 25%, (best, malformed) 15%, (mediocre, bad) 15%,
  (mediocre, malformed) 45%. `chosen` is always well-formed, best in 40% of rows and mediocre in 60%: an
  SFT model imitating `chosen` writes well-formed answers, mostly mediocre, which leaves PPO room to raise
  the reward by moving the policy towards the best level. `rejected` is malformed in 60% of rows, so the
  reward model learns to score such text low instead of meeting it first in PPO's samples. Half of the
  malformed rejected answers (`TWIN_SHARE`) are the chosen answer's wrong-tip twin: the same answer with its
  tip or generic advice replaced by another topic's tip, a spliced tip or a garbled one (a third each).
  Those pairs differ only in content, so the reward model must read the tip against the question; without
  them it scored polite framing alone, and PPO learnt polite off-topic tips. Every row is checked against
  the gold: gold(chosen) > gold(rejected).
- Well-formed responses are 8-30 words (malformed ones up to ~55), so generation with the tiny tokenizer
  needs at most ~48 tokens.

`response_level(prompt, response)` (common/evaluation/synthetic_task.py, re-exported here) is the exact oracle for the
grammar (2/1/0, or -1 for any other text); `common/evaluation/gold.py` grades any text with partial credit.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

# data/ is run as a script (python data/make_synthetic.py); the grammar lives in the importable common/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.evaluation.gold import synthetic_gold  # noqa: E402
from common.evaluation.synthetic_task import (  # noqa: E402, F401  (re-exported: tests use ms.TOPICS, ms.response_level...)
    BAD,
    BEST,
    CLOSERS,
    FOLLOW_UPS,
    GENERIC,
    MEDIOCRE,
    OFF_TOPIC,
    OPENERS,
    PREFIXES,
    REFUSALS,
    RUDE,
    SMALL_TALK,
    TEMPLATES,
    TOPICS,
    UNRECOGNISED,
    Topic,
    last_question,
    prompt_topic,
    response_level,
)

FIELDS = ("prompt", "response", "chosen", "rejected")
MALFORMED = UNRECOGNISED  # the "level" of a rejected answer made malformed on purpose
# (chosen level, rejected level) -> share of rows; counts are exact (rounded, remainder to the largest).
PAIR_MIX: dict[tuple[int, int], float] = {
    (BEST, MEDIOCRE): 0.25,
    (BEST, MALFORMED): 0.15,
    (MEDIOCRE, BAD): 0.15,
    (MEDIOCRE, MALFORMED): 0.45,
}
MULTI_TURN_SHARE = 0.10
DEFAULT_SEED = 0
DEFAULT_N_TRAIN = 3000
DEFAULT_N_TEST = 300
DEFAULT_OUT = Path(__file__).resolve().parent / "synthetic"


# Style shares inside a level (sampled per response, not exact counts).
MEDIOCRE_STYLES = (("curt", 0.5), ("vague", 0.5))
BAD_STYLES = (("rude", 0.4), ("refusal", 0.3), ("off_topic", 0.3))
MALFORMED_STYLES = (
    ("stacked_closers", 0.20),
    ("word_salad", 0.15),
    ("truncated", 0.15),
    ("second_turn", 0.10),
    ("off_topic_tip", 0.15),
    ("spliced_tip", 0.15),
    ("garbled_tip", 0.10),
)
# Share of malformed rejected answers that are the chosen answer's "wrong-tip twin": the same answer with
# its tip (or generic advice) replaced by another topic's tip or a spliced one. Such pairs differ only in
# the content, so the reward model must read the tip against the question to rank them.
TWIN_SHARE = 0.5


def _best(topic: Topic, rng: random.Random) -> str:
    return f" {rng.choice(OPENERS)} {rng.choice(topic.tips)} {rng.choice(CLOSERS)}"


def _pick_style(styles: tuple[tuple[str, float], ...], rng: random.Random) -> str:
    return rng.choices([s for s, _ in styles], weights=[w for _, w in styles])[0]


def make_response(level: int, topic_index: int, rng: random.Random) -> str:
    """One answer of the given quality level (BEST, MEDIOCRE, BAD or MALFORMED) to a question on
    `TOPICS[topic_index]`."""
    topic = TOPICS[topic_index]
    if level == BEST:
        return _best(topic, rng)
    if level == MEDIOCRE:
        if _pick_style(MEDIOCRE_STYLES, rng) == "curt":
            return f" {rng.choice(topic.tips)}"
        return f" {rng.choice(OPENERS)} {rng.choice(GENERIC)}"
    if level == BAD:
        style = _pick_style(BAD_STYLES, rng)
        if style == "rude":
            return f" {rng.choice(RUDE)}"
        if style == "refusal":
            return f" {rng.choice(REFUSALS)}"
        other = _other_topic(topic_index, rng)
        return " " + OFF_TOPIC.format(thing=other.thing, tip=rng.choice(other.tips))
    if level == MALFORMED:
        return _malformed(_pick_style(MALFORMED_STYLES, rng), topic_index, rng)
    raise ValueError(f"unknown level {level!r}; expected one of {BEST}, {MEDIOCRE}, {BAD}, {MALFORMED}")


def _other_topic(topic_index: int, rng: random.Random) -> Topic:
    return TOPICS[rng.choice([i for i in range(len(TOPICS)) if i != topic_index])]


def _malformed(style: str, topic_index: int, rng: random.Random) -> str:
    """A malformed answer in one of MALFORMED_STYLES (see the module docstring)."""
    topic = TOPICS[topic_index]
    opener, closer = rng.choice(OPENERS), rng.choice(CLOSERS)
    if style == "stacked_closers":
        best = rng.random() < 0.6  # else a vague answer, which gets two or three closers
        start = _best(topic, rng) if best else f" {opener} {rng.choice(GENERIC)}"
        extra = [
            closer if rng.random() < 0.6 else rng.choice(CLOSERS) for _ in range(rng.randint(2 - best, 3))
        ]
        return start + " " + " ".join(extra)
    if style == "word_salad":
        pool = " ".join((*topic.tips, *GENERIC)).replace(",", "").replace(".", "").split()
        words = rng.sample(pool, rng.randint(6, 14))
        ending = f" {closer}" if rng.random() < 0.5 else ""
        return f" {opener} {' '.join(words)}.{ending}"
    if style == "truncated":
        words = make_response(rng.choice((BEST, MEDIOCRE)), topic_index, rng).split()
        return " " + " ".join(words[: rng.randint(1, len(words) - 1)])
    if style == "second_turn":
        answer = make_response(rng.choice((BEST, MEDIOCRE)), topic_index, rng)
        turn = rng.choice([human for human, _ in SMALL_TALK] + [opener])
        tail = f"\n\nAssistant: {rng.choice(OPENERS)}" if rng.random() < 0.5 else ""
        return f"{answer}\n\nHuman: {turn}{tail}"
    if style == "off_topic_tip":
        return f" {opener} {rng.choice(_other_topic(topic_index, rng).tips)} {closer}"
    if style == "spliced_tip":
        return f" {opener} {_spliced_tip(topic_index, rng)} {closer}"
    if style == "garbled_tip":
        return f" {opener} {_garbled(rng.choice(topic.tips), rng)} {closer}"
    raise ValueError(f"unknown malformed style {style!r}; expected one of {[s for s, _ in MALFORMED_STYLES]}")


def wrong_tip_twin(answer: str, topic_index: int, rng: random.Random) -> str:
    """`answer` (well-formed, to a question on TOPICS[topic_index]) with its tip or generic advice replaced
    by another topic's tip or a spliced tip (half each): malformed, and ranked below `answer` by the gold."""
    topic = TOPICS[topic_index]
    content = [s for s in (*topic.tips, *GENERIC) if f" {s}" in answer]
    if len(content) != 1:
        raise ValueError(f"expected one tip or generic sentence in {answer!r}, found {content}")
    kind = rng.randrange(3)
    if kind == 0:
        wrong = rng.choice(_other_topic(topic_index, rng).tips)
    elif kind == 1:
        wrong = _spliced_tip(topic_index, rng)
    else:
        wrong = _garbled(rng.choice(topic.tips), rng)
    return answer.replace(f" {content[0]}", f" {wrong}")


def _spliced_tip(topic_index: int, rng: random.Random) -> str:
    """A tip-like sentence that is no tip: the start of one tip joined to the end of another (the first from
    the prompt's topic half of the time), the way a policy's samples drift between memorised sentences."""
    all_tips = [tip for t in TOPICS for tip in t.tips]
    while True:
        first = rng.choice(TOPICS[topic_index].tips) if rng.random() < 0.5 else rng.choice(all_tips)
        second = rng.choice(all_tips)
        a, b = first.rstrip(".").split(), second.split()
        text = " ".join(a[: rng.randint(2, len(a) - 2)] + b[rng.randint(2, len(b) - 2) :])
        if text not in all_tips:
            return text


def _garbled(tip: str, rng: random.Random) -> str:
    """`tip` with a slip of the kind sampling makes: a run of 1-3 words repeated, dropped, or swapped for
    words from elsewhere in the grammar's tips. Still ends with "."; never equal to a tip."""
    words = tip.rstrip(".").split()
    pool = [w.strip(",.") for t in TOPICS for s in t.tips for w in s.split()]
    while True:
        i = rng.randrange(1, len(words) - 1)
        n = rng.randint(1, min(3, len(words) - i))
        kind = rng.randrange(3)
        if kind == 0:
            out = words[: i + n] + words[i : i + n] + words[i + n :]
        elif kind == 1:
            out = words[:i] + words[i + n :]
        else:
            out = words[:i] + [rng.choice(pool) for _ in range(n)] + words[i + n :]
        text = " ".join(out) + "."
        if text != tip:
            return text


def make_prompt(
    topic_index: int, template_index: int, multi_turn: bool, heldout: list[int], rng: random.Random
) -> str:
    """A prompt in rm-static form ending with "\\n\\nAssistant:"; the last Human turn asks the question.

    An earlier question in a multi-turn prompt never uses a held-out (topic, template) combination.
    """
    question = rng.choice(PREFIXES) + TEMPLATES[template_index].format(task=TOPICS[topic_index].task)
    if not multi_turn:
        return f"\n\nHuman: {question}\n\nAssistant:"
    if rng.random() < 0.5:
        human, assistant = rng.choice(SMALL_TALK)
        return f"\n\nHuman: {human}\n\nAssistant: {assistant}\n\nHuman: {question}\n\nAssistant:"
    earlier = rng.choice([i for i in range(len(TOPICS)) if i != topic_index])
    first = TEMPLATES[_train_template(earlier, heldout, rng)].format(task=TOPICS[earlier].task)
    follow = rng.choice(FOLLOW_UPS) + question
    return f"\n\nHuman: {first}\n\nAssistant:{_best(TOPICS[earlier], rng)}\n\nHuman: {follow}\n\nAssistant:"


def _train_template(topic_index: int, heldout: list[int], rng: random.Random) -> int:
    return rng.choice([t for t in range(len(TEMPLATES)) if t != heldout[topic_index]])


def heldout_templates(seed: int) -> list[int]:
    """For each topic, the index of the template reserved for the test split."""
    rng = random.Random(f"heldout-{seed}")
    return [rng.randrange(len(TEMPLATES)) for _ in TOPICS]


def pair_counts(n: int) -> dict[tuple[int, int], int]:
    """Exact number of rows of each (chosen level, rejected level) pair type for n rows."""
    counts = {pair: round(share * n) for pair, share in PAIR_MIX.items()}
    largest = max(PAIR_MIX, key=PAIR_MIX.__getitem__)
    counts[largest] += n - sum(counts.values())
    return counts


def make_split(n: int, test: bool, seed: int) -> list[dict[str, str]]:
    """n rows of one split; the test split uses only the held-out (topic, template) combinations."""
    rng = random.Random(f"{'test' if test else 'train'}-{seed}")
    heldout = heldout_templates(seed)
    pairs = [pair for pair, count in pair_counts(n).items() for _ in range(count)]
    rng.shuffle(pairs)
    rows = []
    for chosen_level, rejected_level in pairs:
        topic = rng.randrange(len(TOPICS))
        template = heldout[topic] if test else _train_template(topic, heldout, rng)
        prompt = make_prompt(topic, template, rng.random() < MULTI_TURN_SHARE, heldout, rng)
        chosen = make_response(chosen_level, topic, rng)
        if rejected_level == MALFORMED and rng.random() < TWIN_SHARE:
            rejected = wrong_tip_twin(chosen, topic, rng)
        else:
            rejected = make_response(rejected_level, topic, rng)
        gold = synthetic_gold([prompt, prompt], [chosen, rejected], [True, True])
        if not gold[0].score > gold[1].score or (rejected_level == MALFORMED) != (
            gold[1].label == "malformed"
        ):
            raise AssertionError(
                f"the gold does not rank this generated pair as designed: {gold} {chosen!r} {rejected!r}"
            )
        rows.append({"prompt": prompt, "response": chosen, "chosen": chosen, "rejected": rejected})
    return rows


def generate(
    seed: int = DEFAULT_SEED, n_train: int = DEFAULT_N_TRAIN, n_test: int = DEFAULT_N_TEST
) -> dict[str, list[dict[str, str]]]:
    """Both splits as lists of rows (dicts with the keys in FIELDS, in that order)."""
    return {"train": make_split(n_train, False, seed), "test": make_split(n_test, True, seed)}


def to_jsonl(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows).encode("utf-8")


def write(
    out_dir: Path = DEFAULT_OUT,
    seed: int = DEFAULT_SEED,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
) -> list[Path]:
    """Write train.jsonl and test.jsonl under out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, rows in generate(seed, n_train, n_test).items():
        path = out_dir / f"{split}.jsonl"
        path.write_bytes(to_jsonl(rows))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--n_train", type=int, default=DEFAULT_N_TRAIN)
    parser.add_argument("--n_test", type=int, default=DEFAULT_N_TEST)
    parser.add_argument("--check", action="store_true", help="verify the files in --out instead of writing")
    args = parser.parse_args(argv)
    if args.check:
        stale = [
            str(args.out / f"{split}.jsonl")
            for split, rows in generate(args.seed, args.n_train, args.n_test).items()
            if not (args.out / f"{split}.jsonl").is_file()
            or (args.out / f"{split}.jsonl").read_bytes() != to_jsonl(rows)
        ]
        if stale:
            print(f"differs from the generator's output: {', '.join(stale)}", file=sys.stderr)
            return 1
        print("up to date")
        return 0
    for path in write(args.out, args.seed, args.n_train, args.n_test):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
