"""build_stage_data: from `data_path` entries to the train/eval Datasets of one stage.

Order of work (validation comes before any splitting or tokenization):
1. Resolve every entry to a source (local path or known hub dataset) and fingerprint it (cache key).
2. On cache miss (local rank 0 only): read and validate every row of every source; bad rows raise a
   DataError naming file/row/column, or are skipped and counted with skip_bad_rows=True.
3. Per source: eval = its own eval split, or a seeded 9:1 split of its train rows. Train rows are permuted
   with the seed and cut by data_split; stage k takes slice k. Eval is NOT sliced: every stage evaluates on
   the source's whole eval split (stages never train on eval rows, so they need no disjointness, and the
   whole split gives less noisy metrics than a 20% slice).
4. Stage 1 also gets all rows (train and eval) of the sft_only_data_path sources.
5. Stage 2 needs pairs: rows without a rejected response are left out and counted per source (printed, and
   in its stats as `without_rejected`); a source that would lose more than half of the rows stage 2 takes
   from it (train slice + eval) this way is a DataError unless skip_bad_rows (an SFT-only hub dataset in
   data_path is an error at once). Unpaired rows (prompt, completion, label) are KTO's: stages 1 and 2 refuse
   a source that has any. Stage 2 with unpaired=True (KTO) takes them, and splits each pair into a desirable
   row (its chosen response) and an undesirable one (its rejected response).
6. Train rows of all sources are mixed by a seeded permutation; eval keeps source order. max_train_samples
   keeps the first rows of the mix, max_eval_samples a seeded sample of the eval rows (a CPU-sized run).
7. Tokenize for the stage, save atomically, and every rank loads the file.
`stats` (also printed on rank 0) holds per-source row counts, skipped/filtered rows and the truncation and
drop counts of tokenization.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from common.data import tokenize
from common.data.cache import build_once_per_node, cache_key
from common.data.chat_format import ChatFormat
from common.data.rows import DataError, Row
from common.data.sources import open_source
from common.data.splits import (
    derive_seed,
    parse_data_split,
    seeded_permutation,
    stage_indices,
    train_eval_indices,
)
from common.data.stage_datasets import PairDataset, PromptDataset, SFTDataset, TokenLists, UnpairedDataset
from common.dist import print_rank0

STAGE_NAMES = {1: "sft", 2: "reward", 3: "ppo"}


@dataclass
class DataConfig:
    """Data options shared by the three stages (DeepSpeed-Chat flag names where they exist)."""

    data_path: list[str]
    data_split: str = "2,4,4"
    sft_only_data_path: list[str] = field(default_factory=list)
    data_output_path: str = "/tmp/data_files"
    max_seq_len: int = 512
    max_prompt_seq_len: int = 256
    seed: int = 1234
    mask_prompt: bool = False
    prompt_overflow: str = "truncate_left"
    skip_bad_rows: bool = False
    apply_chat_template: bool = (
        False  # render prompts with the model's chat template (common.data.chat_format)
    )
    max_train_samples: int = 0  # > 0: the stage trains on at most this many rows of its mixed slice
    max_eval_samples: int = 0  # > 0: it evaluates on a seeded sample of at most this many eval rows

    def validate(self) -> None:
        for name in ("data_path", "sft_only_data_path"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a list of strings, got {value!r}")
        if not self.data_path:
            raise ValueError("data_path is empty: give at least one local path or dataset name")
        parse_data_split(self.data_split)
        if self.max_seq_len < 2 or self.max_prompt_seq_len < 1:
            raise ValueError(
                f"max_seq_len={self.max_seq_len} / max_prompt_seq_len={self.max_prompt_seq_len} too small"
            )
        if self.max_train_samples < 0 or self.max_eval_samples < 0:
            raise ValueError("max_train_samples and max_eval_samples must be >= 0 (0 = all rows)")
        if self.prompt_overflow not in tokenize.PROMPT_OVERFLOW_POLICIES:
            raise ValueError(
                f"prompt_overflow={self.prompt_overflow!r}: expected one of {tokenize.PROMPT_OVERFLOW_POLICIES}"
            )
        overlap = {_identity(p) for p in self.data_path} & {_identity(p) for p in self.sft_only_data_path}
        if overlap:
            raise ValueError(
                f"{sorted(overlap)} in both data_path and sft_only_data_path: SFT would train on all its rows, "
                "including the reward/PPO slices"
            )


@dataclass
class StageData:
    train: Dataset
    eval: Dataset
    stats: dict[str, Any]
    train_sha256: str = ""  # of the tokenized training rows: a resumed run checks it is the same data


def state_sha256(state: Any) -> str:
    """sha256 of a tokenized split's state (nested dicts and lists of tensors, texts and numbers)."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                digest.update(f"<{key}>".encode())
                feed(value[key])
        elif torch.is_tensor(value):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())

    feed(state)
    return digest.hexdigest()


def _identity(entry: str) -> str:
    return str(Path(entry).resolve()) if Path(entry).exists() else entry


def build_stage_data(cfg: DataConfig, tokenizer: Any, stage: int, unpaired: bool = False) -> StageData:
    """The train and eval datasets of `stage`: 1 -> SFTDataset, 2 -> PairDataset (UnpairedDataset with
    `unpaired`: KTO's labelled rows, pairs split in two), 3 -> PromptDataset.

    Call on every rank (local rank 0 builds the cache, the others wait at a barrier). Raises DataError for
    bad data and ValueError for bad options or a tokenizer whose pad id is missing or equals EOS."""
    if stage not in STAGE_NAMES:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    if unpaired and stage != 2:
        raise ValueError(f"unpaired rows are stage 2's (KTO), not stage {stage}'s")
    cfg.validate()
    tokenize.check_tokenizer(tokenizer)
    if cfg.apply_chat_template:
        ChatFormat.for_tokenizer(tokenizer)  # a tokenizer without a usable template fails before any reading
    sources = [("data", open_source(entry)) for entry in cfg.data_path]
    if stage == 1:
        sources += [("sft_only", open_source(entry)) for entry in cfg.sft_only_data_path]
    for _, src in sources:
        if stage == 2 and not src.pairwise:
            raise DataError(
                f"{src.name} has no rejected responses, so the reward model (or DPO) cannot use it; "
                "put it in sft_only_data_path"
            )

    def key() -> str:
        return cache_key(
            {
                "stage": stage,
                "sources": [(role, src.name, src.fingerprint()) for role, src in sources],
                "tokenizer": tokenize.tokenizer_fingerprint(tokenizer),
                "data_split": cfg.data_split,
                "seed": cfg.seed,
                "max_seq_len": cfg.max_seq_len,
                "max_prompt_seq_len": cfg.max_prompt_seq_len,
                "mask_prompt": cfg.mask_prompt,
                "prompt_overflow": cfg.prompt_overflow,
                "skip_bad_rows": cfg.skip_bad_rows,
                "chat_template": tokenizer.chat_template if cfg.apply_chat_template else None,
                "max_samples": (cfg.max_train_samples, cfg.max_eval_samples),
                **({"unpaired": True} if unpaired else {}),  # the other stages' keys stay as they were
            }
        )

    blob, built_now = build_once_per_node(
        cfg.data_output_path,
        f"stage{stage}_{STAGE_NAMES[stage]}" + ("_unpaired" if unpaired else ""),
        key,
        lambda: _build(cfg, tokenizer, stage, sources, unpaired),
    )
    stats = blob["stats"]
    stats["from_cache"] = not built_now
    _report(stats)
    return StageData(
        _to_dataset(blob["train"], stage, cfg, unpaired),
        _to_dataset(blob["eval"], stage, cfg, unpaired),
        stats,
        state_sha256(blob["train"]),
    )


def _build(cfg: DataConfig, tokenizer: Any, stage: int, sources: list, unpaired: bool) -> dict[str, Any]:
    stats: dict[str, Any] = {"stage": stage, "sources": {}}
    train_rows: list[Row] = []
    eval_rows: list[Row] = []
    for role, src in sources:
        rows = src.read(cfg.skip_bad_rows)
        if stage in (1, 2) and not unpaired:
            _refuse_unpaired(rows.train + (rows.eval or []), stage)
        own_train, own_eval = rows.train, rows.eval
        if own_eval is None:
            train_idx, eval_idx = train_eval_indices(len(own_train), cfg.seed)
            own_train, own_eval = [own_train[i] for i in train_idx], [own_train[i] for i in eval_idx]
        if role == "data":
            taken = [own_train[i] for i in stage_indices(len(own_train), cfg.data_split, stage, cfg.seed)]
        else:  # sft_only: stage 1 takes everything
            taken = own_train
        source_stats = stats["sources"][src.name] = {
            "role": role,
            "train_rows": len(own_train),
            "eval_rows": len(own_eval),
            "stage_train_rows": len(taken),
            **rows.tally.as_dict(),
        }
        rows.tally.report()
        if stage == 2:
            taken, own_eval, source_stats["without_rejected"] = _pairs_only(
                src.name, taken, own_eval, cfg.skip_bad_rows, unpaired
            )
            if unpaired:
                taken, own_eval = _split_pairs(taken), _split_pairs(own_eval)
        train_rows += taken
        eval_rows += own_eval

    if stage == 2:
        for split in ("train", "eval"):
            stats[f"{split}_without_rejected"] = sum(
                info["without_rejected"][split] for info in stats["sources"].values()
            )
    if not train_rows:
        why = "; stage 2 keeps only rows that have a rejected response" if stage == 2 else ""
        raise DataError(
            f"stage {stage} has no training rows: its data_split {cfg.data_split!r} slice of "
            f"{[src.name for _, src in sources]} is empty{why}"
        )
    mix = seeded_permutation(len(train_rows), derive_seed(cfg.seed, "mix"))
    train_rows = [train_rows[i] for i in mix]
    if cfg.max_train_samples:
        train_rows = train_rows[: cfg.max_train_samples]
    if cfg.max_eval_samples and len(eval_rows) > cfg.max_eval_samples:
        keep = seeded_permutation(len(eval_rows), derive_seed(cfg.seed, "eval sample"))[
            : cfg.max_eval_samples
        ]
        eval_rows = [eval_rows[i] for i in sorted(keep)]
    stats["train_rows_used"], stats["eval_rows_used"] = len(train_rows), len(eval_rows)

    train, stats["train"] = _tokenize(train_rows, tokenizer, stage, cfg, unpaired)
    evals, stats["eval"] = _tokenize(eval_rows, tokenizer, stage, cfg, unpaired)
    if stats["train"]["rows_out"] == 0:
        raise DataError(f"stage {stage}: every training row was too long (see stats: {stats['train']})")
    return {"stats": stats, "train": _to_state(train), "eval": _to_state(evals)}


def _refuse_unpaired(rows: list[Row], stage: int) -> None:
    """DataError naming the first unpaired row of a source: stage 1 would train on undesirable completions
    and the reward model needs pairs."""
    row = next((r for r in rows if r.label is not None), None)
    if row is not None:
        raise DataError(
            f"{row.origin}: an unpaired row (prompt, completion, label), which stage {stage} cannot use: "
            "unpaired rows are KTO's data (step2_dpo/main.py --loss_type kto); give this stage "
            "prompt/chosen[/rejected] rows"
        )


def _split_pairs(rows: list[Row]) -> list[Row]:
    """KTO's rows: each pair as a desirable row (its chosen response) and an undesirable one (its rejected
    response), next to each other; unpaired rows as they are."""
    out = []
    for r in rows:
        if r.label is not None:
            out.append(r)
        else:
            out.append(Row(r.prompt, r.chosen, None, r.origin, r.extra, True))
            out.append(Row(r.prompt, r.rejected, None, f"{r.origin} (its rejected response)", r.extra, False))
    return out


def _pairs_only(
    source: str, train: list[Row], evals: list[Row], skip_bad_rows: bool, unpaired: bool = False
) -> tuple[list[Row], list[Row], dict[str, int]]:
    """The rows of `source` that have a rejected response (stage 2 trains and evaluates on pairs; with
    `unpaired`, KTO, also the rows that have a label), and how many were left out of train and eval. More
    than half left out is a DataError unless skip_bad_rows: the file is then mostly SFT data, and training on
    the few pairs in it is unlikely to be what was meant."""

    def keep(r: Row) -> bool:
        return r.rejected is not None or (unpaired and r.label is not None)

    kept_train = [r for r in train if keep(r)]
    kept_eval = [r for r in evals if keep(r)]
    left_out = {"train": len(train) - len(kept_train), "eval": len(evals) - len(kept_eval)}
    lost, total = sum(left_out.values()), len(train) + len(evals)
    if 2 * lost > total and not skip_bad_rows:
        raise DataError(
            f"{source}: {lost} of the {total} rows stage 2 takes from it (train slice + eval) have no "
            f"'rejected' response{' and no label' if unpaired else ''}, and the reward model trains on pairs "
            f"only, so it would keep "
            f"{total - lost}; put SFT-only data in --sft_only_data_path, or pass --skip_bad_rows to train "
            "on the pairs anyway"
        )
    return kept_train, kept_eval, left_out


def _tokenize(
    rows: list[Row], tokenizer: Any, stage: int, cfg: DataConfig, unpaired: bool
) -> tuple[dict[str, list], dict]:
    fmt = ChatFormat.for_tokenizer(tokenizer) if cfg.apply_chat_template else None
    if unpaired:
        return tokenize.tokenize_unpaired(rows, tokenizer, cfg.max_seq_len, fmt)
    if stage == 1:
        return tokenize.tokenize_sft(rows, tokenizer, cfg.max_seq_len, fmt)
    if stage == 2:
        return tokenize.tokenize_pairs(rows, tokenizer, cfg.max_seq_len, fmt)
    return tokenize.tokenize_prompts(rows, tokenizer, cfg.max_prompt_seq_len, cfg.prompt_overflow, fmt)


def _to_state(tokens: dict[str, list]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name, values in tokens.items():
        if name.endswith("prompt_len"):
            state[name] = torch.tensor(values, dtype=torch.int64)
        elif name == "desirable":
            state[name] = torch.tensor(values, dtype=torch.bool)
        elif name in ("extra", "prompt_text"):  # texts
            state[name] = list(values)
        else:
            state[name] = TokenLists.from_lists(values).state()
    return state


def _to_dataset(state: dict[str, Any], stage: int, cfg: DataConfig, unpaired: bool) -> Dataset:
    if unpaired:
        return UnpairedDataset(
            TokenLists.from_state(state["input_ids"]), state["prompt_len"], state["desirable"]
        )
    if stage == 1:
        # With a chat template the loss is on the assistant's tokens only, whatever --mask_prompt says.
        mask_prompt = cfg.mask_prompt or cfg.apply_chat_template
        return SFTDataset(TokenLists.from_state(state["input_ids"]), state["prompt_len"], mask_prompt)
    if stage == 2:
        return PairDataset(
            TokenLists.from_state(state["chosen"]),
            TokenLists.from_state(state["rejected"]),
            state["chosen_prompt_len"],
            state["rejected_prompt_len"],
        )
    return PromptDataset(TokenLists.from_state(state["prompt"]), state.get("extra"), state.get("prompt_text"))


def _report(stats: dict[str, Any]) -> None:
    origin = "cache" if stats.get("from_cache") else "built"
    print_rank0(f"[data] stage {stats['stage']} ({origin}): train {stats['train']}, eval {stats['eval']}")
    for name, info in stats["sources"].items():
        print_rank0(f"[data]   {name}: {info}")
        left_out = info.get("without_rejected", {})
        if any(left_out.values()):
            print_rank0(
                f"[data] {name}: stage 2 left out {left_out['train']} of its {info['stage_train_rows']} train "
                f"rows and {left_out['eval']} of its {info['eval_rows']} eval rows: no 'rejected' response "
                "(the reward model trains on pairs only)"
            )
    if stats["eval"]["rows_out"] == 0:
        print_rank0(f"[data] WARNING: stage {stats['stage']} has no eval rows")
