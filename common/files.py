"""The files a stage hands on: written whole or not at all, and checked before they are trusted.

- A final model is written to `<output_dir>/.final.tmp/` and moved into place only once complete
  (`publish_staged`): a run killed while saving leaves the earlier model intact. The stage's metrics file,
  which marks it finished (e2e_rlhf.py skips a stage that has one), is removed before the move and written
  after it (`write_text_atomic`), so a directory never reads as finished over a half-written model.
- Weights and checkpoint files are checked before a stage starts on them: a safetensors file must hold as
  many bytes as its header describes (`check_safetensors`), a JSON file must parse (`read_json_file`). A
  damaged file is a `DamagedFileError` naming it and what to do.
- A write that fails (disk full, a file-size limit, a vanished mount) is a `WriteFailedError` after the
  partial output is removed: the previous checkpoint or model is untouched (`removed_on_write_failure`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import dist
from common.errors import UserError

STAGING = ".final.tmp"  # where a stage writes its final outputs before moving them into place
_REPLACED = ".final.old"  # where replaced output directories wait while the new ones move in
# Test hook: SIGKILL the process once the final outputs are staged, before they are moved into place.
KILL_BEFORE_PUBLISH_ENV = "RLHF_TEST_KILL_BEFORE_PUBLISH"

# Files `save_pretrained` of a model, a reward model and a tokenizer may write at a model directory's root.
MODEL_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "value_head.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
    }
)


def is_model_file(name: str) -> bool:
    """A file name `save_pretrained` writes: MODEL_FILES or a weights shard (model-00001-of-00002.safetensors)."""
    return name in MODEL_FILES or (name.startswith("model-") and name.endswith(".safetensors"))


class DamagedFileError(UserError):
    """A file the pipeline wrote earlier that is truncated or unreadable."""


class WriteFailedError(UserError):
    """A save that could not be written (disk full, file-size limit, I/O error); nothing earlier was lost."""


# ------------------------------------------------------------------------------------------ checking


def check_safetensors(path: str | os.PathLike, fix: str = "") -> None:
    """DamagedFileError unless `path` is a whole safetensors file: an 8-byte header length, a JSON header,
    and exactly as many bytes of tensor data as the header's offsets describe. `fix` ends the message."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DamagedFileError(f"{path}: truncated ({size} bytes, not even a safetensors header){tail}")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise DamagedFileError(
                f"{path}: truncated ({size} bytes; its header alone says {8 + header_len}){tail}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DamagedFileError(f"{path}: corrupt safetensors header ({e}){tail}") from None
    if not isinstance(header, dict):
        raise DamagedFileError(f"{path}: corrupt safetensors header (not a JSON object){tail}")
    try:
        data_end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (TypeError, KeyError, IndexError, ValueError):
        raise DamagedFileError(f"{path}: corrupt safetensors header (bad tensor offsets){tail}") from None
    expected = 8 + header_len + data_end
    if size != expected:
        what = "truncated" if size < expected else "longer than its header describes"
        raise DamagedFileError(f"{path}: {what} ({size} bytes; its header describes {expected}){tail}")


def read_json_file(path: str | os.PathLike, fix: str = "") -> Any:
    """The parsed JSON of `path`, or DamagedFileError naming it (truncated or not UTF-8/JSON)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFileError(
            f"{path}: not valid JSON, truncated or corrupt ({e}){'; ' + fix if fix else ''}"
        ) from None


def check_model_weights(directory: str | os.PathLike, fix: str = "") -> None:
    """Check every safetensors file of a model directory (weights, shards, a reward model's value head) and
    that a shard index names only shards that exist. DamagedFileError naming the first bad file."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = set(read_json_file(index, fix).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            raise DamagedFileError(
                f"{index}: names shards that are missing: {missing[:3]}{'; ' + fix if fix else ''}"
            )
    for file in sorted(directory.glob("*.safetensors")):
        check_safetensors(file, fix)


# ------------------------------------------------------------------------------------------- writing


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with removed_on_write_failure(f"writing {path}", tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def is_write_failure(exc: BaseException) -> bool:
    """Whether `exc` is a failed write (disk full, file-size limit, I/O error) as raised by Python, torch's
    zip writer or safetensors, rather than a bug."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return any(
        s in text
        for s in (
            "I/O error",
            "os error",
            "file write failed",
            "inline_container",
            "PytorchStreamWriter",
            "iostream error",
        )
    )


@contextmanager
def removed_on_write_failure(what: str, partial: str | os.PathLike, keeps: str = "") -> Iterator[None]:
    """Run a save; if a write fails, remove `partial` (what the save had written) and raise WriteFailedError
    saying `what` failed, why, the free space left, and `keeps` (what is intact). Other errors propagate
    untouched (a killed save's leftovers are never read: see the callers)."""
    try:
        yield
    except Exception as e:
        if not is_write_failure(e):
            raise
        partial = Path(partial)
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        try:
            free = f"{shutil.disk_usage(partial.parent).free / 2**20:,.0f} MiB free there now"
        except OSError:
            free = "free space unknown"
        raise WriteFailedError(
            f"{what} failed: {type(e).__name__}: {e} ({free}). The partial write was removed"
            f"{'; ' + keeps if keeps else ''}. If the disk is full or a file-size limit (ulimit -f) applies, "
            "make room and run again."
        ) from None


def staging_dir(output_dir: str | os.PathLike) -> Path:
    """An empty `<output_dir>/.final.tmp/` for a stage's final outputs (call on rank 0)."""
    staged = Path(output_dir) / STAGING
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    return staged


def publish_staged(output_dir: str | os.PathLike, finished_marker: str) -> None:
    """Move everything in `<output_dir>/.final.tmp/` into `output_dir` (rank 0), replacing what an earlier
    run of the stage wrote there: files by rename, directories (OUT/ppo/actor) by renaming the old one away
    first. The finished marker (the metrics file) is removed first; the caller writes the new one last.
    Model files of the earlier run that the new save did not write (e.g. shards of a sharded model) are
    removed, so the directory holds one model."""
    out = Path(output_dir)
    staged = out / STAGING
    (out / finished_marker).unlink(missing_ok=True)
    new = {p.name for p in staged.iterdir()}
    for stale in out.iterdir():
        if stale.is_file() and is_model_file(stale.name) and stale.name not in new:
            stale.unlink()
    replaced = out / _REPLACED
    if replaced.exists():
        shutil.rmtree(replaced)
    for item in sorted(staged.iterdir()):
        target = out / item.name
        if item.is_dir() and target.exists():
            replaced.mkdir(exist_ok=True)
            os.replace(target, replaced / item.name)
        os.replace(item, target)
    shutil.rmtree(replaced, ignore_errors=True)
    staged.rmdir()


@contextmanager
def final_outputs(output_dir: str | os.PathLike, finished_marker: str) -> Iterator[Path]:
    """Collective: yield `<output_dir>/.final.tmp/` for the stage's final outputs (models, answers); once
    the block completes on every rank, rank 0 moves them into `output_dir` (`publish_staged`). The caller
    then writes `finished_marker` (`write_text_atomic`). A failed write removes the staging directory and
    raises WriteFailedError; the earlier outputs stay as they were."""
    out = Path(output_dir)
    if dist.is_rank0():
        staging_dir(out)
    dist.barrier()
    keeps = f"what {out} held before is intact"
    with removed_on_write_failure(f"saving the final outputs into {out / STAGING}", out / STAGING, keeps):
        yield out / STAGING
    dist.barrier()
    if os.environ.get(KILL_BEFORE_PUBLISH_ENV):  # test hook: a kill at the worst moment of the save
        os.kill(os.getpid(), signal.SIGKILL)
    if dist.is_rank0():
        publish_staged(out, finished_marker)
    dist.barrier()


def jsonl_rows(path: str | os.PathLike, fields: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Every non-empty line of a small JSON-lines file of a tool's (prompts, pairs), as an object whose
    `fields` are non-empty strings; ValueError naming the file, the line and what is wrong for anything else.
    (Training data goes through common/data, which reports every bad row of a file at once.)"""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got a {type(row).__name__}")
            for key in fields:
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"{path}:{line_no}: field {key!r} is missing, empty or not a string")
            yield row
