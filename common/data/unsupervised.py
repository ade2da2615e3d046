"""Unsupervised text for the PPO-ptx loss: documents -> one token stream -> fixed-size blocks.

Like run_clm's group_texts, with document boundaries kept: the documents' token ids are joined with the
EOS id BETWEEN consecutive documents, the stream is cut into blocks of `block_size`, and the tail shorter
than a block is dropped (counted in `stats`). Empty documents are skipped and counted.

Sources: a local .txt (one document per line), .jsonl, .json or .parquet file with a `text` field, or a
Hub dataset name (its `train` split's `text` column) loaded with datasets.load_dataset(name, config_name).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from common.data.cache import build_once_per_node, cache_key
from common.data.local_files import BadLine, content_hash, read_records
from common.data.rows import DataError, has_undecodable_bytes
from common.data.stage_datasets import BlockDataset
from common.data.tokenize import encode_texts, tokenizer_fingerprint


def _local_documents(path: Path) -> list[tuple[str, Any]]:
    docs = []
    for origin, record in read_records(path):
        if isinstance(record, BadLine):
            raise DataError(f"{origin}: {record.problem}")
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f"{origin}, column 'text': missing column")
        docs.append((origin, record["text"]))
    return docs


def _hub_documents(name: str, config_name: str | None) -> list[tuple[str, Any]]:
    import datasets

    train = datasets.load_dataset(name, config_name)["train"]
    if "text" not in train.column_names:
        raise DataError(f"{name}: no 'text' column (has {train.column_names})")
    return [(f"{name} split 'train' row index {i}", t) for i, t in enumerate(train["text"])]


def _hub_fingerprint(name: str, config_name: str | None) -> str:
    import datasets

    train = datasets.load_dataset(name, config_name)["train"]
    return f"hub:{name}:{config_name}:{getattr(train, '_fingerprint', None)}"


def _build_blocks(docs: list[tuple[str, Any]], tokenizer: Any, block_size: int) -> dict[str, Any]:
    texts = []
    for origin, value in docs:
        if not isinstance(value, str):
            raise DataError(f"{origin}, column 'text': expected a string, got {type(value).__name__}")
        if has_undecodable_bytes(value):
            raise DataError(f"{origin}, column 'text': not valid UTF-8")
        if value.strip():
            texts.append(value)
    stream: list[int] = []
    for i, ids in enumerate(encode_texts(tokenizer, texts)):
        if i:
            stream.append(tokenizer.eos_token_id)
        stream.extend(ids)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise DataError(f"{len(stream)} tokens of text are fewer than one block of {block_size}")
    blocks = torch.tensor(stream[: n_blocks * block_size], dtype=torch.int32).view(n_blocks, block_size)
    stats = {
        "documents": len(texts),
        "empty_documents_skipped": len(docs) - len(texts),
        "tokens": len(stream),
        "blocks": n_blocks,
        "tail_tokens_dropped": len(stream) - n_blocks * block_size,
    }
    return {"blocks": blocks, "stats": stats}


def load_unsupervised(
    name_or_path: str,
    config_name: str | None,
    tokenizer: Any,
    block_size: int,
    cache_dir: str | None = None,
) -> BlockDataset:
    """BlockDataset of (block_size,) token blocks from a local file or a Hub dataset's `text` column.

    With `cache_dir`, the blocks are cached like the stage data (local rank 0 builds, all ranks load), keyed
    by the file content (or Hub fingerprint), the tokenizer and block_size. Call on every rank then."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer.eos_token_id is None: it separates the documents")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    path = Path(name_or_path)
    if path.exists() and not path.is_file():
        raise DataError(f"{path}: expected a .txt/.jsonl/.json/.parquet file, got a directory")

    def documents() -> list[tuple[str, Any]]:
        return _local_documents(path) if path.exists() else _hub_documents(name_or_path, config_name)

    def build() -> dict[str, Any]:
        return _build_blocks(documents(), tokenizer, block_size)

    if cache_dir is None:
        blob = build()
    else:

        def key() -> str:
            source = (
                f"local:{content_hash([path])}"
                if path.exists()
                else _hub_fingerprint(name_or_path, config_name)
            )
            return cache_key(
                {
                    "unsupervised": source,
                    "tokenizer": tokenizer_fingerprint(tokenizer),
                    "block_size": block_size,
                }
            )

        name = hashlib.sha256(name_or_path.encode()).hexdigest()[:12]
        blob, _ = build_once_per_node(cache_dir, f"unsup_{name}", key, build)
    return BlockDataset(blob["blocks"], blob["stats"])
