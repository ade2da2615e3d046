"""Grading held-out answers, for any stage that samples a policy on prompts it never trained on (PPO in
stage 3, DPO): the gold reward hook (`--gold_reward`), its scores and label shares, and the text measures
that flag reward hacking without a gold (common/evaluation/text_metrics.py), in one line for the log.

    gold_mean, gold_share_<label>
                        the gold reward's mean and the share of each of its labels, when a gold is known
                        (`--gold_reward`: the bundled task's `common.evaluation.gold:synthetic_gold` by default)
    eos_fraction, response_length, repeated_3gram_rate, distinct_2, leaked_turn_markers
                        measures that flag reward hacking on any data
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from common import dist
from common.args import BUNDLED_DATA
from common.evaluation.metrics import GOLD_SHARE_PREFIX
from common.evaluation.score_fn import ScoreFunction, call_score_function, import_score_function
from common.evaluation.text_metrics import answer_measures
from common.models.sampling import decode_answer
from common.training.engines import to_device

ANSWERS_FILE = "heldout_answers.jsonl"
BUNDLED_GOLD = "common.evaluation.gold:synthetic_gold"
MEASURES = ("eos_fraction", "repeated_3gram_rate", "distinct_2", "leaked_turn_markers")


GoldReward = ScoreFunction  # a gold scorer is a score function named by --gold_reward


def is_bundled_data(data_path: Sequence[str]) -> bool:
    """Whether --data_path names exactly the bundled synthetic dataset (however the path is spelled)."""
    return [Path(p).resolve() for p in data_path] == [Path(BUNDLED_DATA).resolve()]


def load_gold_reward(spec: str, data_path: Sequence[str]) -> GoldReward | None:
    """The --gold_reward flag -> a GoldReward, or None. 'none': no gold; 'auto': the bundled task's gold when
    --data_path is the bundled dataset, else none; 'module:function': that function (importable from the
    working directory or PYTHONPATH). SystemExit saying what is wrong when it cannot be loaded."""
    if spec == "none" or (spec == "auto" and not is_bundled_data(data_path)):
        return None
    name = BUNDLED_GOLD if spec == "auto" else spec
    if ":" not in name:
        raise SystemExit(f"--gold_reward {spec!r}: expected 'module:function', 'auto' or 'none'")
    fn = import_score_function(name, "--gold_reward")
    labels = (
        tuple(getattr(importlib.import_module(name.partition(":")[0]), "LABELS", ()))
        if name == BUNDLED_GOLD
        else ()
    )
    return GoldReward(name, fn, labels)


def gold_scores(
    gold: GoldReward, prompts: list[str], responses: list[str], finished: list[bool]
) -> tuple[list[float], list[str | None]]:
    """Call the gold scorer on held-out answers -> (scores, labels; None where it gave no label); SystemExit
    naming the function and the held-out sample when it fails (common.evaluation.score_fn.call_score_function)."""
    return call_score_function(gold, prompts, responses, finished, what="held-out")


def gold_stats(gold: GoldReward, scores: list[float], labels: list[str | None]) -> dict[str, float]:
    """{"gold_mean": mean score, "gold_share_<label>": share of answers with that label} over the labels of
    `gold.labels` and those given."""
    n = max(len(scores), 1)
    stats = {"gold_mean": sum(scores) / n}
    for label in dict.fromkeys([*gold.labels, *(x for x in labels if x is not None)]):
        stats[f"{GOLD_SHARE_PREFIX}{label}"] = sum(x == label for x in labels) / n
    return stats


def role_token_ids(tokenizer) -> set[int]:
    """Special tokens an answer should never hold other than EOS and padding (a chat template's role tokens
    such as <|im_start|>), as ids: their presence in an answer counts as a leaked turn marker."""
    routine = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
    return set(tokenizer.all_special_ids) - routine


def rank0_answer_stats(
    answers: list[dict[str, Any]], gold: GoldReward | None, roles: set[int]
) -> dict[str, float]:
    """Text measures and gold statistics of the gathered answers, computed on rank 0 and sent to every rank
    (so a failing gold stops all ranks with its message). Adds "gold" (and "gold_label") to each answer and
    removes the token-level fields."""
    result: dict[str, float] | str = {}
    if dist.is_rank0():
        texts, tokens = [a["_text"] for a in answers], [a["_tokens"] for a in answers]
        try:
            result = answer_measures(texts, tokens, roles)
            if gold is not None:
                prompts, finished = [a["prompt"] for a in answers], [a["_finished"] for a in answers]
                scores, labels = gold_scores(gold, prompts, texts, finished)
                result.update(gold_stats(gold, scores, labels))
                for a, score, label in zip(answers, scores, labels, strict=True):
                    a["gold"], a["gold_label"] = score, label
        except SystemExit as e:
            result = str(e)
        for a in answers:
            for key in ("_tokens", "_text", "_finished"):
                del a[key]
    if dist.get_world_size() > 1:
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, str):
        raise SystemExit(result)
    return result


def format_eval(stats: dict[str, float]) -> str:
    """One line of an evaluation's statistics for the log: proxy (when there is one), KL, gold, then the
    hacking measures."""
    parts = [f"proxy {stats['score']:+.3f}"] if "score" in stats else []  # DPO has no proxy
    if "kl" in stats:  # a reference-free preference loss has no reference to measure it against
        parts.append(f"kl {stats['kl']:.3f}")
    if "gold_mean" in stats:
        parts.append(f"gold {stats['gold_mean']:+.3f}")
    shares = [
        f"{k.removeprefix(GOLD_SHARE_PREFIX)} {v:.2f}"
        for k, v in stats.items()
        if k.startswith(GOLD_SHARE_PREFIX)
    ]
    if shares:
        parts.append(" ".join(shares))
    parts += [
        f"eos {stats['eos_fraction']:.2f}",
        f"len {stats['response_length']:.1f}",
        f"rep3 {stats['repeated_3gram_rate']:.3f}",
        f"distinct2 {stats['distinct_2']:.3f}",
        f"turn markers {stats['leaked_turn_markers']:.2f}",
    ]
    return " | ".join(parts)


@dataclass
class SampledAnswers:
    """One batch of sampled answers to held-out prompts (P prompt columns, left-padded; R answer columns)."""

    seq: torch.Tensor  # (B, P + R) prompt + answer, padding after each answer's first EOS
    mask: torch.Tensor  # (B, R) 1 on the answer's tokens, up to and including its first EOS
    ends: torch.Tensor  # (B,) bool: the answer ended with EOS within the budget
    kl: torch.Tensor | None  # (B,) per-sequence KL of the answer to the reference policy; None: no reference
    scores: torch.Tensor | None = None  # (B,) the proxy reward model's normalised score, when there is one


@torch.no_grad()
def evaluate_answers(
    sample: Callable[[torch.Tensor, torch.Tensor, list[dict] | None, list[str] | None], SampledAnswers],
    loader: DataLoader,
    dev: torch.device,
    seed: int,
    tokenizer: Any,
    gold: GoldReward | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Answer every held-out prompt once with `sample(prompts (B, P), prompt_mask (B, P), extra, prompt_text)`
    (extra: the prompts' extra dataset columns, a list of B dicts, or None when the data has none;
    prompt_text: their original texts when the ids are a chat-template rendering, else None) and return (stats,
    answers): stats are the same on every rank (response_length, eos_fraction, kl when `sample` gives KLs,
    score when it gives proxy scores, and the gold's and the text measures of `rank0_answer_stats`); answers
    (rank 0; empty elsewhere) hold every prompt with its answer (and score, gold, gold_label), in the eval set's
    order.

    `loader` is a `common.training.engines.eval_loader`: rank r holds rows r, r + world, ... padded with placeholder
    rows (`real` False) that are sampled, to keep ranks in step, but not counted. Sampling is seeded with
    `seed + rank` inside a forked RNG, so every evaluation of a run samples alike and the training RNG is
    left as it was."""
    rank, world = dist.get_rank(), dist.get_world_size()
    totals = torch.zeros(5, dtype=torch.float64, device=dev)  # score, length, eos, kl, count
    answers: list[dict[str, Any]] = []
    position, has_proxy, has_kl = 0, False, False  # position: of this rank's rows
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed + rank)
        for batch, real in loader:
            batch = to_device(batch, dev)
            prompt_len = batch["input_ids"].shape[1]
            texts = batch.get("prompt_text")
            out = sample(batch["input_ids"], batch["attention_mask"], batch.get("extra"), texts)
            seq, mask, ends, kl = out.seq, out.mask, out.ends, out.kl
            has_proxy = out.scores is not None  # the same `sample`, so the same on every rank
            has_kl = kl is not None
            zeros = torch.zeros(seq.shape[0], dtype=torch.float64, device=seq.device)
            scores = out.scores.double() if has_proxy else zeros
            kl = kl.double() if has_kl else zeros
            r = real.to(dev)
            lengths = mask.sum(1)
            totals += torch.stack(
                [
                    scores[r].sum(),
                    lengths[r].double().sum(),
                    ends[r].double().sum(),
                    kl[r].sum(),
                    r.sum().double(),
                ]
            )
            for i in range(seq.shape[0]):
                if real[i]:
                    prompt, tokens, text = decode_answer(
                        tokenizer, seq[i], mask[i], bool(ends[i]), prompt_len, texts and texts[i]
                    )
                    answer = {
                        "index": rank + (position + i) * world,
                        "prompt": prompt,
                        "answer": tokenizer.decode(seq[i, prompt_len:][mask[i].bool()]),
                        "_tokens": tokens,
                        "_text": text,
                        "_finished": bool(ends[i]),
                    }
                    if has_proxy:
                        answer["score"] = scores[i].item()
                    answers.append(answer)
            position += seq.shape[0]
    if world > 1:
        torch.distributed.all_reduce(totals)
        gathered: list[list[dict[str, Any]]] | None = [[] for _ in range(world)] if rank == 0 else None
        torch.distributed.gather_object(answers, gathered, dst=0)
        answers = [a for part in gathered for a in part] if gathered is not None else []
    answers.sort(key=lambda a: a["index"])
    n = max(totals[4].item(), 1.0)
    stats = {"score": totals[0].item() / n} if has_proxy else {}
    if has_kl:
        stats["kl"] = totals[3].item() / n
    stats.update({"response_length": totals[1].item() / n, "eos_fraction": totals[2].item() / n})
    stats.update(rank0_answer_stats(answers, gold, role_token_ids(tokenizer)))
    return stats, answers


def write_heldout_answers(path: Path, before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    """One JSON line per held-out prompt: prompt, the stage-1 policy's and the trained policy's answers, their
    proxy scores when there is a proxy, and their gold scores and labels when a gold is known. Answers are
    decoded with special tokens, so an answer that stopped at EOS shows it."""
    if [a["index"] for a in before] != [a["index"] for a in after]:
        raise ValueError("write_heldout_answers: the before and after evaluations cover different prompts")
    with open(path, "w") as f:
        for b, a in zip(before, after, strict=True):
            row = {"prompt": b["prompt"], "before": b["answer"], "after": a["answer"]}
            for key in ("score", "gold", "gold_label"):
                if key in b and key in a:
                    row[f"{key}_before"], row[f"{key}_after"] = b[key], a[key]
            f.write(json.dumps(row) + "\n")
