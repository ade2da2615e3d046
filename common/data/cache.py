"""The on-disk cache of tokenized data: content-addressed keys, atomic writes, one build per node.

The key is a sha256 over everything that decides the tokenized result (see `cache_key`'s callers); the
file is `<data_output_path>/<prefix>_<key>.pt`, a plain dict of tensors and JSON-like stats loaded with
`torch.load(weights_only=True)`. A changed input therefore gives a new file name instead of stale data;
old files are never overwritten in place.

Building: on every node, local rank 0 computes the key and builds the file if it is missing while the other
ranks wait at `common.dist.barrier()`; then every rank loads it. If local rank 0 fails, it writes the error
message next to the cache before reaching the barrier, so the other ranks raise the same error instead of
hanging.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common import dist
from common.data.rows import DataError

CACHE_VERSION = 3  # bump whenever the tokenized format or any tokenization rule changes


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 of the JSON of `parts` (sorted keys) plus CACHE_VERSION."""
    payload = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def save_atomic(blob: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_blob(path: Path) -> dict[str, Any]:
    blob = torch.load(path, weights_only=True)
    if blob.get("cache_version") != CACHE_VERSION:
        raise DataError(
            f"{path}: cache version {blob.get('cache_version')} != {CACHE_VERSION}; delete the file"
        )
    return blob


def build_once_per_node(
    cache_dir: str | os.PathLike,
    prefix: str,
    key_fn: Callable[[], str],
    build_fn: Callable[[], dict[str, Any]],
) -> tuple[dict[str, Any], bool]:
    """Return (blob, built_now): the cached blob for key_fn(), built by local rank 0 with build_fn() if absent.

    Must be called by every rank (it contains a barrier)."""
    cache_dir = Path(cache_dir)
    error_file = cache_dir / f"{prefix}.build_error.txt"
    built_now = False
    if dist.get_local_rank() == 0:
        try:
            error_file.unlink(missing_ok=True)
            path = cache_dir / f"{prefix}_{key_fn()}.pt"
            if path.exists() and (damage := _damage(path)):
                print(f"[data] {path} is damaged ({damage}); rebuilding it", flush=True)
                path.unlink()
            if not path.exists():
                blob = build_fn()
                save_atomic({"cache_version": CACHE_VERSION, **blob}, path)
                built_now = True
        except BaseException as e:
            cache_dir.mkdir(parents=True, exist_ok=True)
            error_file.write_text(f"{type(e).__name__}: {e}")
            dist.barrier()
            raise
        dist.barrier()
    else:
        dist.barrier()
        if error_file.exists():
            raise DataError(f"local rank 0 failed to build the data: {error_file.read_text()}")
        path = cache_dir / f"{prefix}_{key_fn()}.pt"
        if not path.exists():
            raise DataError(
                f"{path} is missing after local rank 0 built it: data_output_path must be the same path on "
                "every rank of a node"
            )
    return load_blob(path), built_now


def _damage(path: Path) -> str | None:
    """Why the cache file cannot be read (truncated, corrupt, another version), or None. Only our own
    cache is ever rebuilt: its name is the content key, so a rebuild gives the same data."""
    try:
        load_blob(path)
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None
