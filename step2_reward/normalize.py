"""Reward normalisation after stage-2 training (docs/ppo-fidelity.md item 11; Ziegler et al. 2019).

The trained reward model scores a sample of responses; gain and bias are fitted so that
gain * raw + bias has mean 0 and std 1 on that sample, and are saved in the model's config.json, so a
loaded model returns normalised scores with `rm(ids, mask, normalize=True)`.

Which sample (`--normalization_sample`):
- policy: responses sampled from the reference (SFT) policy given by `--normalization_policy_path`.
  This is what step 3 feeds the reward model at its start (its actor and reference start as this
  policy), so mean 0 / std 1 there makes the step-3 scores interpretable: a PPO score of +1 means one
  standard deviation better than the starting policy. The prompts are the stage-3 prompt slice of the
  same data (the prompts step 3 will train on), at most max_seq_len - max_new_tokens tokens, cut from
  the left as step 3 cuts them. Sampling follows item 5: do_sample, temperature 0.7, top_k 0 (off),
  top_p 1, stop at EOS and keep it, mask everything after it; position_ids are not passed to
  `generate` (item 4). Each rank samples with seed + rank (item 21).
- chosen: the chosen responses of the stage-2 training pairs (prompt + chosen + EOS, as trained). The
  fallback when no policy is given: no generation needed, but human-preferred responses score higher
  than the policy's, so step-3 scores will start somewhat below 0.
- auto (default): policy when a policy path is given, else chosen (printed loudly).
- none: gain 1, bias 0.

Every rank scores the same number of batches (placeholder rows fill the shorter shards), because under
ZeRO-3 each reward-model forward is a collective. The raw scores of all ranks are gathered, the fit is
computed identically on every rank, and rank 0 writes the sample (token ids, texts, raw scores) to
`normalization_sample.jsonl` so anyone can recompute the statistics from the saved model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from common import dist
from common.args import data_config
from common.data import DataError, PromptCollator, build_stage_data, pad_sequences
from common.data.tokenize import tokenizer_fingerprint
from common.models.loading import load_tokenizer
from common.models.reward_model import RewardModel, fit_normalization
from common.models.sampling import SamplingSettings, sample_answers
from common.training.ds_config import torch_dtype
from common.training.engines import eval_loader, to_device

SAMPLE_CHOICES = ("auto", "policy", "chosen", "none")
SAMPLE_FILE = "normalization_sample.jsonl"


def add_normalization_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the post-training normalisation (see the module docstring)."""
    g = parser.add_argument_group("reward normalisation")
    g.add_argument(
        "--normalization_sample",
        choices=SAMPLE_CHOICES,
        default="auto",
        help="Responses the gain/bias are fitted on: 'policy' (samples of --normalization_policy_path), "
        "'chosen' (chosen responses of the training pairs), 'auto' (policy if a path is given, else "
        "chosen), 'none' (gain 1, bias 0).",
    )
    g.add_argument(
        "--normalization_policy_path",
        type=str,
        default=None,
        help="The reference (SFT) policy whose samples define mean 0 / std 1, e.g. the stage-1 output; it "
        "must use the reward model's tokenizer.",
    )
    g.add_argument(
        "--normalization_num_samples",
        type=int,
        default=256,
        help="Responses in the normalisation sample (capped by the prompts or pairs available).",
    )
    g.add_argument(
        "--normalization_max_new_tokens",
        type=int,
        default=256,
        help="Longest sampled response; prompts keep at most max_seq_len minus this many tokens.",
    )
    g.add_argument(
        "--normalization_temperature",
        type=float,
        default=0.7,
        help="Sampling temperature of the policy (use step 3's temperature).",
    )


def check_normalization_args(args: argparse.Namespace) -> None:
    """Cross-flag checks before any compute; SystemExit with the reason."""
    if args.normalization_sample == "policy" and not args.normalization_policy_path:
        raise SystemExit("--normalization_sample policy needs --normalization_policy_path")
    if args.normalization_sample != "none" and args.normalization_num_samples < 2:
        raise SystemExit("--normalization_num_samples must be at least 2 to fit a std")
    if args.normalization_temperature <= 0:
        raise SystemExit("--normalization_temperature must be > 0 (sampling, item 5)")
    if resolve_sample(args) == "policy" and not 0 < args.normalization_max_new_tokens < args.max_seq_len:
        raise SystemExit(
            f"--normalization_max_new_tokens {args.normalization_max_new_tokens} must be in "
            f"[1, --max_seq_len {args.max_seq_len}): prompts get the rest of max_seq_len"
        )


def resolve_sample(args: argparse.Namespace) -> str:
    """'auto' -> 'policy' or 'chosen'; other choices pass through."""
    if args.normalization_sample != "auto":
        return args.normalization_sample
    return "policy" if args.normalization_policy_path else "chosen"


class _ChosenCollator:
    """[{"chosen_input_ids", ...}] -> {"input_ids", "attention_mask"} (B, T), right-padded."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids, mask = pad_sequences([b["chosen_input_ids"] for b in batch], self.pad_token_id, "right")
        return {"input_ids": ids, "attention_mask": mask}


def _sample_index(rank: int, world: int, position: int) -> int:
    # eval_loader gives rank r the items r, r + world, r + 2 * world, ... of the dataset.
    return rank + position * world


@torch.no_grad()
def _score(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).scores.float()


def _chosen_records(
    engine, tokenizer: PreTrainedTokenizerBase, pairs: Dataset, n: int, batch_size: int, dev: torch.device
) -> list[dict[str, Any]]:
    """Score the chosen sequences of the first n training pairs (this rank's shard)."""
    loader = eval_loader(Subset(pairs, range(n)), _ChosenCollator(tokenizer.pad_token_id), batch_size)
    rank, world, position, records = dist.get_rank(), dist.get_world_size(), 0, []
    for batch, real in loader:
        scores = _score(engine, to_device(batch, dev)).cpu()
        for row in range(len(real)):
            if real[row]:
                ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
                records.append(
                    {
                        "index": _sample_index(rank, world, position),
                        "input_ids": ids,
                        "text": tokenizer.decode(ids),
                        "raw_score": scores[row].item(),
                    }
                )
            position += 1
    return records


def _load_policy(
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    dev: torch.device,
    allow_pickle_weights: bool = False,
):
    """The reference policy as a plain HF model in eval mode (no DeepSpeed: it only generates here)."""
    policy_tokenizer = load_tokenizer(path)
    if tokenizer_fingerprint(policy_tokenizer) != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"--normalization_policy_path {path}: its tokenizer differs from the reward model's, so its "
            "token ids would mean something else to the reward model; use a policy trained with the same "
            "tokenizer (e.g. the stage-1 output of the same base model)"
        )
    policy = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=None if allow_pickle_weights else True
    )
    return policy.to(dev).eval()


def _policy_records(
    engine,
    tokenizer: PreTrainedTokenizerBase,
    args: argparse.Namespace,
    n: int,
    prompts: Dataset,
    dev: torch.device,
) -> list[dict[str, Any]]:
    """Sample one response per prompt for the first n prompts (this rank's shard) and score
    prompt + response, where the response ends at its first EOS (kept) and is masked after it."""
    policy = _load_policy(
        args.normalization_policy_path,
        tokenizer,
        torch_dtype(args.dtype),
        dev,
        getattr(args, "allow_pickle_weights", False),
    )
    settings = SamplingSettings(
        max_new_tokens=args.normalization_max_new_tokens, temperature=args.normalization_temperature
    )
    torch.manual_seed(args.seed + dist.get_rank())  # item 21: sampling seed differs per rank
    loader = eval_loader(
        Subset(prompts, range(n)), PromptCollator(tokenizer.pad_token_id), args.per_device_eval_batch_size
    )
    rank, world, position, records = dist.get_rank(), dist.get_world_size(), 0, []
    for batch, real in loader:
        batch = to_device(batch, dev)
        width = batch["input_ids"].shape[1]
        answers = sample_answers(policy, tokenizer, batch["input_ids"], batch["attention_mask"], settings)
        out, mask = answers.seq, answers.attention_mask
        scores = _score(engine, {"input_ids": out, "attention_mask": mask}).cpu()
        out, mask = out.cpu(), mask.cpu()
        for row in range(len(real)):
            if real[row]:
                prompt_ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
                response_ids = out[row, width:][mask[row, width:].bool()].tolist()
                records.append(
                    {
                        "index": _sample_index(rank, world, position),
                        "input_ids": prompt_ids + response_ids,
                        "prompt_len": len(prompt_ids),
                        "ends_with_eos": bool(response_ids) and response_ids[-1] == tokenizer.eos_token_id,
                        "prompt": tokenizer.decode(prompt_ids),
                        "response": tokenizer.decode(response_ids, skip_special_tokens=True),
                        "raw_score": scores[row].item(),
                    }
                )
            position += 1
    del policy
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return records


def _gather(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's records, on every rank, sorted by sample index."""
    if dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        torch.distributed.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: r["index"])


def normalize_reward_model(
    engine,
    tokenizer: PreTrainedTokenizerBase,
    args: argparse.Namespace,
    pairs: Dataset,
    dev: torch.device,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Fit gain/bias on the sample `--normalization_sample` names and set them on `engine.module`.

    pairs: the stage-2 training PairDataset (for the 'chosen' sample).
    Returns (summary for rm_metrics.json, the sample's records: index, input_ids, texts, raw_score).
    Every rank must call it.
    """
    rm: RewardModel = engine.module
    kind = resolve_sample(args)
    rm.gain, rm.bias, rm.normalization_sample = 1.0, 0.0, "none"
    if kind == "none":
        dist.print_rank0("[reward] normalisation: none (gain 1, bias 0)")
        return {"sample": "none", "gain": 1.0, "bias": 0.0}, []

    banner = "=" * 100
    if kind == "chosen":
        why = "given" if args.normalization_sample == "chosen" else "auto: no --normalization_policy_path"
        dist.print_rank0(
            f"{banner}\n[reward] NORMALISATION SAMPLE: chosen responses of the training pairs ({why}).\n"
            "[reward] Step 3 scores its policy's samples, which usually score lower than human-chosen ones: "
            "pass --normalization_policy_path <SFT model> to fit on the policy instead (item 11).\n"
            f"{banner}"
        )
    else:
        dist.print_rank0(
            f"{banner}\n[reward] NORMALISATION SAMPLE: responses sampled from the reference policy "
            f"{args.normalization_policy_path} (T={args.normalization_temperature}, top_k 0, top_p 1) "
            f"on the stage-3 prompts.\n{banner}"
        )

    engine.eval()
    if kind == "chosen":
        n = min(args.normalization_num_samples, len(pairs))
        records = _chosen_records(engine, tokenizer, pairs, n, args.per_device_eval_batch_size, dev)
        description = f"{n} chosen responses of the stage-2 training pairs"
    else:
        cfg = data_config(args)
        cfg.max_prompt_seq_len = args.max_seq_len - args.normalization_max_new_tokens
        try:
            prompts = build_stage_data(cfg, tokenizer, stage=3).train
        except DataError as e:
            raise DataError(
                f"normalisation prompts are the stage-3 slice of --data_split {args.data_split!r}: {e}; give "
                "stage 3 a share or use --normalization_sample chosen"
            ) from e
        n = min(args.normalization_num_samples, len(prompts))
        records = _policy_records(engine, tokenizer, args, n, prompts, dev)
        description = (
            f"{n} samples of {args.normalization_policy_path} (temperature {args.normalization_temperature}, "
            f"top_k 0, top_p 1, max {args.normalization_max_new_tokens} new tokens) on stage-3 prompts"
        )
    engine.train()
    records = _gather(records)
    raw = torch.tensor([r["raw_score"] for r in records], dtype=torch.float64)
    gain, bias = fit_normalization(raw)
    rm.set_normalization(gain, bias, description)
    summary = {
        "sample": kind,
        "description": description,
        "num_samples": len(records),
        "raw_mean": raw.mean().item(),
        "raw_std": raw.std(unbiased=False).item(),
        "gain": gain,
        "bias": bias,
    }
    if kind == "policy":
        summary["fraction_ending_in_eos"] = sum(r["ends_with_eos"] for r in records) / len(records)
    dist.print_rank0(
        f"[reward] normalisation on {description}: raw mean {summary['raw_mean']:.4f}, "
        f"std {summary['raw_std']:.4f} -> gain {gain:.6f}, bias {bias:.6f}"
        + (f"; {summary['fraction_ending_in_eos']:.0%} of responses end in EOS" if kind == "policy" else "")
    )
    return summary, records


def write_sample(records: list[dict[str, Any]], output_dir: str | Path) -> None:
    """Write the normalisation sample as JSON lines (rank 0 only)."""
    if not dist.is_rank0() or not records:
        return
    with (Path(output_dir) / SAMPLE_FILE).open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
