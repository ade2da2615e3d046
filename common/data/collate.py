"""Collators: pad a batch dynamically to its longest sequence with pad_token_id (attention_mask 0 on pads).

- SFTCollator: right padding; labels are -100 on pads (and wherever the dataset already put -100).
- PairCollator: right padding; chosen and rejected stacked into one (2B, T) batch, rows [chosen_0..chosen_{B-1},
  rejected_0..rejected_{B-1}] (DeepSpeed-Chat's layout: one forward pass scores both; chosen = rows[:B]).
- UnpairedCollator: right padding; one row per example with its prompt length and label (KTO).
- PromptCollator: LEFT padding, so every prompt ends at the last column and generation continues from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from common.data.stage_datasets import IGNORE_INDEX


def pad_sequences(
    seqs: Sequence[torch.Tensor], pad_value: int, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D tensors into (N, T) padded with pad_value on `side` ("right"/"left"); returns (ids, mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, cols] = seq
        mask[row, cols] = 1
    return ids, mask


class SFTCollator:
    """[{"input_ids", "labels"}] -> {"input_ids", "attention_mask", "labels"}, each (B, T), right-padded."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_sequences([b["input_ids"] for b in batch], self.pad_token_id, "right")
        labels, _ = pad_sequences([b["labels"] for b in batch], IGNORE_INDEX, "right")
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PairCollator:
    """[{"chosen_input_ids", "rejected_input_ids"[, "chosen_prompt_len", "rejected_prompt_len"]}] ->
    {"input_ids", "attention_mask"}, each (2B, T), right-padded, plus "prompt_lens" (2B,) when the items carry
    them; rows [:B] are the chosen sequences, rows [B:] the rejected ones, in batch order."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        seqs = [b["chosen_input_ids"] for b in batch] + [b["rejected_input_ids"] for b in batch]
        input_ids, attention_mask = pad_sequences(seqs, self.pad_token_id, "right")
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "chosen_prompt_len" in batch[0]:
            lens = [b["chosen_prompt_len"] for b in batch] + [b["rejected_prompt_len"] for b in batch]
            out["prompt_lens"] = torch.tensor([int(n) for n in lens], dtype=torch.long)
        return out


class UnpairedCollator:
    """[{"input_ids", "prompt_len", "desirable"}] (UnpairedDataset) -> {"input_ids", "attention_mask"}, each
    (N, T), right-padded, "prompt_lens" (N,) and "desirable" (N,) bool: the batch DPO's code reads, one row per
    example."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_sequences([b["input_ids"] for b in batch], self.pad_token_id, "right")
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "prompt_lens": torch.tensor([int(b["prompt_len"]) for b in batch], dtype=torch.long),
            "desirable": torch.tensor([bool(b["desirable"]) for b in batch], dtype=torch.bool),
        }


class PromptCollator:
    """[{"input_ids"(, "extra", "prompt_text")}] -> {"input_ids", "attention_mask"}, each (B, P), LEFT-padded
    for generation, "extra": the rows' extra dataset columns (a list of B dicts) and "prompt_text": their
    original prompt texts (B str, chat-template data), when the dataset has them."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = pad_sequences([b["input_ids"] for b in batch], self.pad_token_id, "left")
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "extra" in batch[0]:
            out["extra"] = [b["extra"] for b in batch]
        if "prompt_text" in batch[0]:
            out["prompt_text"] = [b["prompt_text"] for b in batch]
        return out


def collator_for_stage(stage: int, pad_token_id: int) -> SFTCollator | PairCollator | PromptCollator:
    """The collator matching build_stage_data(..., stage)'s datasets."""
    collators = {1: SFTCollator, 2: PairCollator, 3: PromptCollator}
    if stage not in collators:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    return collators[stage](pad_token_id)
