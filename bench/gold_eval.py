"""Grade policies of the bundled task with the gold reward (common/evaluation/gold.py) on held-out prompts.

    python bench/gold_eval.py --model out/sft [--model out/ppo/actor ...] [--num_prompts 128]
    python bench/gold_eval.py --answers out/ppo/heldout_answers.jsonl

`--model DIR`: samples one answer per prompt of the first `--num_prompts` rows of data/synthetic/test.jsonl
(the prompts stage 3 evaluates on) at `--temperature` (the rollout temperature, 0.7) with at most
`--max_new_tokens` tokens, cuts each answer at its first EOS and grades it: finished = EOS within the budget.
`--answers FILE`: grades the `before` and `after` columns of stage 3's heldout_answers.jsonl (answers decoded
with special tokens, so "<|endoftext|>" marks where an answer stopped).
Prints, per policy, the gold mean, the share of each label and a few sample answers; with --json, one JSON
line per policy instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.evaluation.gold import LABELS, GoldScore, summarize, synthetic_gold  # noqa: E402

TEST_FILE = REPO / "data" / "synthetic" / "test.jsonl"
EOS_TEXT = "<|endoftext|>"


def test_prompts(path: Path = TEST_FILE, n: int = 128) -> list[str]:
    """The prompts of the first n rows of an rm-static JSONL file, in file order."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line, _ in zip(f, range(n), strict=False)]


@torch.no_grad()
def sample_policy(
    model_dir: str, prompts: list[str], temperature: float, max_new_tokens: int, seed: int, batch: int = 64
) -> tuple[list[str], list[bool]]:
    """One sampled answer per prompt (`common.models.sampling.sample_answers`, stage 3's settings): (answers decoded
    without special tokens and cut at the first EOS, finished flags: EOS within max_new_tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.models.sampling import SamplingSettings, decode_answer, sample_answers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature)
    torch.manual_seed(seed)
    answers, finished = [], []
    for start in range(0, len(prompts), batch):
        enc = tokenizer(prompts[start : start + batch], return_tensors="pt", padding=True)
        out = sample_answers(model, tokenizer, enc.input_ids, enc.attention_mask, settings)
        for i in range(out.seq.shape[0]):
            ends = bool(out.ends[i])
            _, _, text = decode_answer(tokenizer, out.seq[i], out.action_mask[i], ends, out.prompt_len)
            answers.append(text)
            finished.append(ends)
    return answers, finished


def split_at_eos(text: str) -> tuple[str, bool]:
    """An answer decoded with special tokens -> (the text before the first EOS, pads removed; finished)."""
    head, eos, _ = text.partition(EOS_TEXT)
    return head.replace("<pad>", ""), bool(eos)


def report(name: str, prompts: list[str], answers: list[str], finished: list[bool], show: int) -> dict:
    """Grade the answers, print the summary (and `show` sample answers); returns the summary."""
    scores: list[GoldScore] = synthetic_gold(prompts, answers, finished)
    summary = {"policy": name, "n": len(scores), **summarize(scores)}
    mix = "  ".join(f"{label} {summary[label]:.3f}" for label in LABELS)
    print(f"{name}: gold mean {summary['gold_mean']:+.3f}  {mix}  (n={len(scores)})")
    for answer, done, score in list(zip(answers, finished, scores, strict=True))[:show]:
        print(f"    [{score.label} {score.score:+.2f}{'' if done else ', no EOS'}] {answer!r}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], help="model directory to sample from (repeatable)")
    p.add_argument(
        "--answers", action="append", default=[], help="a stage-3 heldout_answers.jsonl (repeatable)"
    )
    p.add_argument("--test_file", type=Path, default=TEST_FILE)
    p.add_argument("--num_prompts", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--show", type=int, default=3, help="sample answers printed per policy")
    p.add_argument("--json", action="store_true", help="also print one JSON line per policy")
    a = p.parse_args(argv)
    if not a.model and not a.answers:
        p.error("give at least one --model or --answers")
    summaries = []
    for model_dir in a.model:
        prompts = test_prompts(a.test_file, a.num_prompts)
        answers, finished = sample_policy(model_dir, prompts, a.temperature, a.max_new_tokens, a.seed)
        summaries.append(report(model_dir, prompts, answers, finished, a.show))
    for path in a.answers:
        with Path(path).open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        for column in ("before", "after"):
            cut = [split_at_eos(r[column]) for r in rows]
            summaries.append(
                report(
                    f"{path}:{column}",
                    [r["prompt"] for r in rows],
                    [c[0] for c in cut],
                    [c[1] for c in cut],
                    a.show,
                )
            )
    if a.json:
        for summary in summaries:
            print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
