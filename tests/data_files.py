"""Helpers for the tests/test_data_*.py files: a tiny tokenizer built in memory and small data files.

The tokenizer is a byte-level BPE trained on a few sentences (milliseconds), wrapped in
PreTrainedTokenizerFast with "<pad>" (id 0) and "</s>" (EOS, id 1) as special tokens.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt, then bake it.",
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital of France.",
    "I do not know. Go away. Nobody cares about that question at all.",
]


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def make_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """A fresh tiny tokenizer (pad "<pad>" id 0, eos "</s>" id 1); pad=False leaves pad_token unset."""
    kwargs = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="</s>", **kwargs
    )


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pair_rows(n: int, tag: str = "q") -> list[dict]:
    """n distinct rows in the prompt/chosen/rejected schema."""
    return [
        {
            "prompt": f"\n\nHuman: {tag} question {i}?\n\nAssistant:",
            "chosen": f" Good answer {i}.",
            "rejected": f" Bad answer {i}.",
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
