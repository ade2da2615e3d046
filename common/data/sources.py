"""Resolving a `data_path` entry to a source, fingerprinting it, and reading it into validated rows.

An entry that exists on disk is a local source (a .jsonl/.json/.parquet file or a directory of them, in the
prompt/chosen/rejected schema, texts taken verbatim); otherwise it must be a key of `HUB_ADAPTERS`.

The fingerprint goes into the cache key: for local sources the sha256 of the files' CONTENT (so editing a
file under the same name rebuilds the cache), for hub sources the name, config and the `datasets`
fingerprint of each split (which changes with the downloaded revision).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data.hub_adapters import HUB_ADAPTERS, HubAdapter
from common.data.local_files import BadLine, content_hash, read_records, split_files
from common.data.rows import DataError, Row, RowError, RowFiltered, RowTally, make_row


@dataclass
class SourceRows:
    """The validated rows of one source. eval is None when the source has no eval split of its own."""

    train: list[Row]
    eval: list[Row] | None
    tally: RowTally


class LocalSource:
    """A local file or directory in the prompt/chosen/rejected schema."""

    def __init__(self, path: str):
        self.name = path
        self.path = Path(path)
        self.train_files, self.eval_files = split_files(self.path)
        self.pairwise = True  # unknown until read; stage 2 checks the rows themselves

    def fingerprint(self) -> str:
        return "local:" + content_hash(self.train_files) + ":" + content_hash(self.eval_files)

    def read(self, skip_bad_rows: bool) -> SourceRows:
        tally = RowTally(self.name, skip_bad_rows)
        train = self._read_files(self.train_files, tally)
        evals = self._read_files(self.eval_files, tally) if self.eval_files else None
        return SourceRows(train, evals, tally)

    @staticmethod
    def _read_files(files: list[Path], tally: RowTally) -> list[Row]:
        rows: list[Row] = []
        for path in files:
            n_before = len(rows)
            for origin, record in read_records(path):
                if isinstance(record, BadLine):
                    tally.bad_row(origin, None, record.problem)
                    continue
                try:
                    rows.append(make_row(record, origin))
                except RowError as e:
                    tally.bad_row(origin, e.column, e.problem)
            if len(rows) == n_before:
                raise DataError(f"{path}: no usable rows (empty file, or every row was bad)")
        return rows


class HubSource:
    """A Hugging Face Hub dataset read through its adapter."""

    def __init__(self, adapter: HubAdapter):
        self.name = adapter.name
        self.adapter = adapter
        self.pairwise = adapter.pairwise
        self._splits: Any = None

    def _load(self) -> Any:
        if self._splits is None:
            import datasets

            try:
                self._splits = datasets.load_dataset(self.adapter.hf_path, self.adapter.config)
            except Exception as e:
                raise DataError(
                    f"{self.name}: datasets.load_dataset({self.adapter.hf_path!r}, {self.adapter.config!r}) "
                    f"failed: {e}"
                ) from e
            for split in (self.adapter.train_split, self.adapter.eval_split):
                if split is not None and split not in self._splits:
                    raise DataError(f"{self.name}: no split {split!r} (has {list(self._splits)})")
        return self._splits

    def fingerprint(self) -> str:
        splits = self._load()
        parts = [self.adapter.hf_path, str(self.adapter.config)]
        parts += [f"{name}={getattr(splits[name], '_fingerprint', None)}" for name in sorted(splits)]
        return "hub:" + hashlib.sha256("|".join(parts).encode()).hexdigest()

    def read(self, skip_bad_rows: bool) -> SourceRows:
        splits = self._load()
        tally = RowTally(self.name, skip_bad_rows)
        train = self._convert(splits[self.adapter.train_split], self.adapter.train_split, tally)
        evals = None
        if self.adapter.eval_split is not None:
            evals = self._convert(splits[self.adapter.eval_split], self.adapter.eval_split, tally)
        return SourceRows(train, evals, tally)

    def _convert(self, native_rows: Any, split: str, tally: RowTally) -> list[Row]:
        rows = convert_native_rows(self.adapter, native_rows, split, tally)
        if not rows:
            raise DataError(f"{self.name} split {split!r}: no usable rows")
        return rows


def convert_native_rows(adapter: HubAdapter, native_rows: Any, split: str, tally: RowTally) -> list[Row]:
    """Map native rows through the adapter and validate them; bad rows raise or are counted in `tally`."""
    rows = []
    for index, native in enumerate(native_rows):
        origin = f"{adapter.name} split {split!r} row index {index}"
        try:
            prompt, chosen, rejected = adapter.to_texts(native)
            rows.append(make_row({"prompt": prompt, "chosen": chosen, "rejected": rejected}, origin))
        except RowFiltered as e:
            tally.filter_row(e.reason)
        except RowError as e:
            tally.bad_row(origin, e.column, e.problem)
    return rows


def open_source(entry: str) -> LocalSource | HubSource:
    """The source a `data_path` entry names: an existing local path first, else a known hub dataset."""
    if not isinstance(entry, str) or not entry.strip():
        raise DataError(f"data_path entry {entry!r}: expected a non-empty string")
    if Path(entry).exists():
        return LocalSource(entry)
    if entry in HUB_ADAPTERS:
        return HubSource(HUB_ADAPTERS[entry])
    known = "\n  ".join(sorted(HUB_ADAPTERS))
    raise DataError(
        f"data_path entry {entry!r} is neither an existing local file/directory nor a known dataset. "
        f"Known datasets:\n  {known}"
    )
