"""Reading local data files into (origin, record) pairs, with errors that name the file and the row.

Formats:
- `.jsonl`: one JSON object per line; rows are named by 1-based line number; blank lines are ignored.
- `.json`: a list of objects (rows named by 0-based index). A `.json` file whose first character is "{"
  is read as JSON Lines, since that is what `datasets.Dataset.to_json` writes.
- `.parquet`: rows named by 0-based index.
- `.txt` (unsupervised text only): one document per line, 1-based line numbers.
- a directory: its data files (and those in its `data/` subfolder) named train* are the train split,
  test* / eval* / valid* / dev* the eval split; any other data file is an error, not silently ignored.

Undecodable bytes never raise a UnicodeDecodeError from deep inside a library: in JSON Lines and text files
the line is reported as not valid UTF-8; in `.json` files the bytes are kept as lone surrogates
(surrogateescape) and `rows.check_text` reports the row and column that hold them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.data.rows import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# Files that may sit beside the splits under a split-like name without being data (notes, locks).
NOT_DATA_SUFFIXES = (".md", ".lock", ".crc")
TRAIN_PREFIXES = ("train",)
EVAL_PREFIXES = ("test", "eval", "valid", "dev")


class BadLine:
    """A line that could not even be parsed (invalid JSON, bad bytes); stands in for a record."""

    def __init__(self, problem: str):
        self.problem = problem


Record = Any  # a parsed JSON value or parquet row, or BadLine


def _bad_utf8(e: UnicodeDecodeError) -> BadLine:
    return BadLine(f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte offset {e.start} of the line)")


def read_records(path: Path) -> Iterator[tuple[str, Record]]:
    """Yield (origin, record) for every row of a data file; the origin names the file and the row."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and _starts_with_object(path)):
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json_list(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix == ".txt":
        yield from _read_text_lines(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def _starts_with_object(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"{")


def _read_jsonl(path: Path) -> Iterator[tuple[str, Record]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            origin = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield origin, _bad_utf8(e)
                continue
            if not line.strip():
                continue
            try:
                yield origin, json.loads(line)
            except json.JSONDecodeError as e:
                yield origin, BadLine(f"invalid JSON ({e.msg}: column {e.colno})")


def _read_json_list(path: Path) -> Iterator[tuple[str, Record]]:
    content = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if not content.strip():
        return  # an empty file: no rows (the caller reports it)
    try:
        data = json.loads(content)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got a {type(data).__name__}")
    for index, record in enumerate(data):
        yield f"{path} row index {index}", record


def _read_parquet(path: Path) -> Iterator[tuple[str, Record]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read as parquet ({e})") from None
    for index, record in enumerate(table.to_pylist()):
        yield f"{path} row index {index}", record


def _read_text_lines(path: Path) -> Iterator[tuple[str, Record]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            origin = f"{path} line {lineno}"
            try:
                yield origin, {"text": raw.decode("utf-8").rstrip("\r\n")}
            except UnicodeDecodeError as e:
                yield origin, _bad_utf8(e)


def split_files(path: Path) -> tuple[list[Path], list[Path]]:
    """The (train, eval) data files of a local source: a file is train-only; a directory is classified."""
    if path.is_file():
        return [path], []
    candidates = [p for folder in (path, path / "data") if folder.is_dir() for p in sorted(folder.iterdir())]
    data_files = [p for p in candidates if p.is_file() and p.suffix.lower() in DATA_SUFFIXES]
    unread = [
        p.name
        for p in candidates
        if p.is_file()
        and p.name.lower().startswith(TRAIN_PREFIXES + EVAL_PREFIXES)
        and p.suffix.lower() not in DATA_SUFFIXES + NOT_DATA_SUFFIXES
    ]
    if unread:
        raise DataError(
            f"{path}: {unread} look like data splits, in a format this project does not read; convert them "
            "to .jsonl, .json or .parquet, or move them out of the directory"
        )
    train = [p for p in data_files if p.name.lower().startswith(TRAIN_PREFIXES)]
    evals = [p for p in data_files if p.name.lower().startswith(EVAL_PREFIXES)]
    unknown = [p.name for p in data_files if p not in train and p not in evals]
    if unknown:
        raise DataError(
            f"{path}: cannot tell whether {unknown} hold train or eval rows; "
            f"name data files train* or test*/eval*/valid*/dev*"
        )
    if not train:
        raise DataError(
            f"{path}: no train file (train.jsonl, train.json, train*.parquet) in it or in {path}/data"
        )
    return train, evals


def content_hash(files: list[Path]) -> str:
    """sha256 over the names and bytes of `files`: changes whenever any file's content changes."""
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
