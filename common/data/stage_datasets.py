"""Map-style torch Datasets over tokenized rows, and the compact ragged storage they sit on.

Items are unpadded 1-D LongTensors; the collators in `common.data.collate` pad them per batch.
- SFTDataset   -> {"input_ids": (L,), "labels": (L,)}; labels are -100 on the prompt when mask_prompt.
- PairDataset  -> {"chosen_input_ids": (Lc,), "rejected_input_ids": (Lr,), "chosen_prompt_len": (),
                   "rejected_prompt_len": ()}
- UnpairedDataset -> {"input_ids": (L,), "prompt_len": (), "desirable": ()} (KTO's labelled rows)
- PromptDataset -> {"input_ids": (P,)}
- BlockDataset -> {"input_ids": (S,), "attention_mask": (S,), "labels": (S,)} fixed-size LM blocks.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100


class TokenLists:
    """A list of variable-length id sequences stored as one flat int32 tensor plus offsets."""

    def __init__(self, flat: torch.Tensor, offsets: torch.Tensor):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def from_lists(cls, seqs: list[list[int]]) -> TokenLists:
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
        offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        flat = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.int32)
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.flat[self.offsets[i] : self.offsets[i + 1]].long()

    def state(self) -> dict[str, torch.Tensor]:
        return {"flat": self.flat, "offsets": self.offsets}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> TokenLists:
        return cls(state["flat"], state["offsets"])


class SFTDataset(Dataset):
    """Prompt + chosen + EOS sequences with their prompt lengths (prompt_lens: (N,) int64)."""

    def __init__(self, input_ids: TokenLists, prompt_lens: torch.Tensor, mask_prompt: bool):
        self.input_ids, self.prompt_lens, self.mask_prompt = input_ids, prompt_lens, mask_prompt

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        labels = ids.clone()
        if self.mask_prompt:
            labels[: int(self.prompt_lens[i])] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}


class PairDataset(Dataset):
    """Preference pairs: prompt + chosen + EOS and prompt + rejected + EOS, with the number of prompt tokens
    each side kept (chosen_prompt_lens, rejected_prompt_lens: (N,) int64; the reward model ignores them,
    DPO scores the tokens after them)."""

    def __init__(
        self,
        chosen: TokenLists,
        rejected: TokenLists,
        chosen_prompt_lens: torch.Tensor,
        rejected_prompt_lens: torch.Tensor,
    ):
        assert len(chosen) == len(rejected) == len(chosen_prompt_lens) == len(rejected_prompt_lens)
        self.chosen, self.rejected = chosen, rejected
        self.chosen_prompt_lens, self.rejected_prompt_lens = chosen_prompt_lens, rejected_prompt_lens

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "chosen_input_ids": self.chosen[i],
            "rejected_input_ids": self.rejected[i],
            "chosen_prompt_len": self.chosen_prompt_lens[i],
            "rejected_prompt_len": self.rejected_prompt_lens[i],
        }


class UnpairedDataset(Dataset):
    """KTO's rows: prompt + completion + EOS, the number of prompt tokens kept (prompt_lens: (N,) int64) and
    whether the completion is desirable (desirable: (N,) bool)."""

    def __init__(self, input_ids: TokenLists, prompt_lens: torch.Tensor, desirable: torch.Tensor):
        assert len(input_ids) == len(prompt_lens) == len(desirable)
        self.input_ids, self.prompt_lens, self.desirable = input_ids, prompt_lens, desirable

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "prompt_len": self.prompt_lens[i],
            "desirable": self.desirable[i],
        }


class PromptDataset(Dataset):
    """PPO prompts (no EOS, no padding), with each row's extra dataset columns (a dict, {} for none) when the
    data has any, and its original prompt text when the ids are a chat-template rendering of it."""

    def __init__(self, prompts: TokenLists, extra: list[str] | None = None, texts: list[str] | None = None):
        self.prompts = prompts
        self.extra = extra
        self.texts = texts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.prompts[i]}
        if self.extra is not None:
            item["extra"] = json.loads(self.extra[i]) if self.extra[i] else {}
        if self.texts is not None:
            item["prompt_text"] = self.texts[i]
        return item


class BlockDataset(Dataset):
    """Fixed-size blocks of a token stream (blocks: (N, block_size) int32) for the PPO-ptx LM loss.

    `stats` says how many documents were read, skipped as empty, and how many tail tokens were dropped."""

    def __init__(self, blocks: torch.Tensor, stats: dict):
        self.blocks, self.stats = blocks, stats

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i].long()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
