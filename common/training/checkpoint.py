"""Resumable training: atomic checkpoints, resume, the output-directory guard and the non-finite check.

Layout of a run's output directory (every stage):

    <output_dir>/.rlhf_run.json             which stage wrote here, and its command (the guard reads it)
    <output_dir>/train_log.jsonl            one line per optimizer step: {"step": N, "loss": ...}
    <output_dir>/checkpoints/step_<N>/      a complete checkpoint (only these are ever resumed from):
        <engine name>/...                   engine.save_checkpoint of each trainable engine (ZeRO shards)
        trainer_state.json                  step, epoch, micro-batches done in the epoch, world size, extra
        rng_rank<r>.json / .safetensors     python, numpy (json) and torch, cuda (safetensors) RNG of rank r
        COMPLETE                            written last; a directory without it is ignored
    <output_dir>/checkpoints/step_<N>.tmp/  a save in progress (or one killed halfway): never resumed from

A save writes into `step_<N>.tmp`, waits for every rank, then rank 0 renames it to `step_<N>` and writes
`COMPLETE` last, so a run killed at any moment leaves either a complete checkpoint or one that `latest`
skips. ZeRO shards are per rank: a checkpoint resumes on the same number of ranks only. Resuming on a
different number is refused with a message (DeepSpeed's `ds_to_universal.py` converts a checkpoint to a
universal one, which this project does not load yet).

Resuming restores the engines (weights, optimizer, scheduler, step counters), the epoch and the number of
micro-batches of it already consumed (the DistributedSampler order is a function of seed and epoch, so
those are skipped), and each rank's RNG; the per-step losses then equal an uninterrupted run's.

No pickle of ours: RNG states are JSON + safetensors. The engines' own files are DeepSpeed's format
(torch.save), read back by DeepSpeed's load_checkpoint; resume only checkpoints you wrote.

Test hook: the environment variable RLHF_TEST_INJECT_NAN_AT_STEP=k makes `check_finite_loss` see a NaN
loss once, at the first micro-batch of optimizer step k (1-based), to test the non-finite stop and skip.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from common import dist
from common.files import (
    DamagedFileError,
    check_safetensors,
    read_json_file,
    removed_on_write_failure,
)

TRAIN_LOG = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
INJECT_NAN_ENV = "RLHF_TEST_INJECT_NAN_AT_STEP"
STEP_DIR = re.compile(r"^step_(\d+)$")
_injected: set[int] = set()


class NonFiniteError(RuntimeError):
    """A loss or gradient norm that is NaN or infinite."""


@dataclass
class TrainerState:
    """Where training stands at a checkpoint.

    step: optimizer steps done (engine.global_steps); epoch: the epoch in progress (0-based);
    batches_in_epoch: micro-batches of that epoch already consumed; skipped_steps: micro-batches skipped
    for a non-finite loss; extra: stage-specific JSON state (eval curves, later a KL controller...)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_steps: int = 0
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    # What the data position depends on (`data_position`): a resume with other values is refused.
    data_position: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- train log


def append_train_log(output_dir: str | Path, record: dict[str, Any]) -> None:
    """Rank 0 appends one JSON line (e.g. {"step": 3, "loss": 2.1}) to <output_dir>/train_log.jsonl."""
    if dist.is_rank0():
        with open(Path(output_dir) / TRAIN_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")


def truncate_train_log(output_dir: str | Path, step: int) -> None:
    """Drop the log lines after `step` (written by a killed run past its last checkpoint)."""
    path = Path(output_dir) / TRAIN_LOG
    if not dist.is_rank0() or not path.is_file():
        return
    keep = [json.dumps(r) for r in read_train_log(output_dir) if r["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def read_train_log(output_dir: str | Path) -> list[dict[str, Any]]:
    """The log's records; a last line cut short (a run killed while appending it) is left out."""
    path = Path(output_dir) / TRAIN_LOG
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise DamagedFileError(f"{path} line {i + 1}: not valid JSON") from None
    return records


# ------------------------------------------------------------------------------------------ non-finite


def check_finite_loss(
    loss: torch.Tensor, *, stage: str, step: int, name: str = "loss", skip: bool = False
) -> bool:
    """True if `loss` is finite on every rank. Otherwise raise NonFiniteError naming stage, step and
    tensor, or return False when `skip`. `step` is the optimizer step being computed (1-based).
    Collective: every rank must call it for the same micro-batch."""
    inject = os.environ.get(INJECT_NAN_ENV)
    if inject is not None and int(inject) == step and step not in _injected:
        _injected.add(step)  # once: a skipped micro-batch leaves the step number where it was
        loss = loss * float("nan")
    ok = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if ok.item() == 1.0:
        return True
    if skip:
        dist.print_rank0(f"[{stage}] step {step}: non-finite {name} on some rank; micro-batch skipped")
        return False
    raise NonFiniteError(
        f"[{stage}] step {step}: non-finite {name} ({loss.detach().float().flatten()[:4].tolist()} on rank "
        f"{dist.get_rank()} or another rank); stopped before backward, no checkpoint written. Resume from "
        "the last checkpoint (--resume), or pass --skip_nonfinite_steps to skip such micro-batches."
    )


def check_finite_grad_norm(engine, *, stage: str, step: int) -> None:
    """Raise NonFiniteError when DeepSpeed reports a NaN/inf global gradient norm for the step just taken
    (None, when DeepSpeed computed none, passes). The step has been applied: no checkpoint is written."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return
    norm = float(norm)
    if not math.isfinite(norm):
        raise NonFiniteError(
            f"[{stage}] step {step}: non-finite gradient norm ({norm}); stopped without writing a "
            "checkpoint. Resume from the last checkpoint (--resume)."
        )


# ---------------------------------------------------------------------------------------- checkpoints


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories under <output_dir>/checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / COMPLETE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    version, keys, pos = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [version, list(keys), pos],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return meta, tensors


def save_checkpoint(
    output_dir: str | Path,
    engines: dict[str, Any],
    state: TrainerState,
    save_total_limit: int = 0,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete checkpoint of `engines` (name -> DeepSpeed engine) and `state` as
    <output_dir>/checkpoints/step_<state.step>, atomically. Collective: every rank calls it.
    `write_extra(directory)`, called on every rank, adds files of its own (e.g. EMA weights) before the
    checkpoint is marked complete. Then keep only the newest `save_total_limit` checkpoints (0: all).
    Returns the final directory."""
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"step_{state.step}"
    tmp = root / f"step_{state.step}.tmp"
    if dist.is_rank0():
        for stale in (tmp, final):  # a save of this step killed halfway, or one left without COMPLETE
            if stale.exists():
                shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    dist.barrier()
    previous = complete_checkpoints(output_dir)
    keeps = (
        f"the previous checkpoint ({previous[-1]}) is intact" if previous else "no earlier checkpoint existed"
    )
    with removed_on_write_failure(f"writing checkpoint {tmp}", tmp, keeps):
        for name, engine in engines.items():
            engine.save_checkpoint(str(tmp), tag=name, save_latest=False)
        if write_extra is not None:
            write_extra(tmp)
        meta, tensors = _rng_state()
        rank = dist.get_rank()
        (tmp / f"rng_rank{rank}.json").write_text(json.dumps(meta))
        save_file(tensors, str(tmp / f"rng_rank{rank}.safetensors"))
        if dist.is_rank0():
            state.world_size = dist.get_world_size()
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        dist.barrier()
        if dist.is_rank0():
            manifest = {"files": _file_sizes(tmp)}
            os.replace(tmp, final)
            with open(final / COMPLETE, "w") as f:  # last: the checkpoint exists from here on
                f.write(json.dumps(manifest, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if save_total_limit > 0:
            for old in complete_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old)
    dist.barrier()
    return final


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()
    }


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What is wrong with a complete checkpoint's files, or None when they are whole: every file the
    manifest in COMPLETE lists must exist with its size (checkpoints written before 2026-12-07 have no
    manifest), the trainer state and RNG JSON must parse and the RNG safetensors must be whole."""
    try:
        text = (checkpoint / COMPLETE).read_text()
        manifest = json.loads(text) if text.strip() != "ok" else {"files": {}}
        for rel, size in manifest["files"].items():
            file = checkpoint / rel
            if not file.is_file():
                return f"{file} is missing"
            if file.stat().st_size != size:
                return f"{file} has {file.stat().st_size} bytes, {size} were written (truncated or replaced)"
        state = read_json_file(checkpoint / STATE_FILE)
        for rank in range(int(state.get("world_size", 1))):
            read_json_file(checkpoint / f"rng_rank{rank}.json")
            check_safetensors(checkpoint / f"rng_rank{rank}.safetensors")
    except DamagedFileError as e:
        return str(e)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{checkpoint}: unreadable ({type(e).__name__}: {e})"
    return None


def resolve_checkpoint(output_dir: str | Path, resume: str) -> Path:
    """The checkpoint directory `--resume` names: 'latest' -> the newest complete one whose files are whole
    (a damaged one is reported and passed over); else a path, which must be a complete, whole checkpoint.
    Raises SystemExit saying what is missing or damaged. Rank 0 decides; every rank gets its answer."""
    if not dist.is_rank0():
        found = dist.broadcast_object(None)
        if isinstance(found, tuple):
            raise SystemExit(found[1])
        return found
    try:
        found = _resolve(Path(output_dir), resume)
    except SystemExit as e:
        dist.broadcast_object(("error", str(e)))
        raise
    return dist.broadcast_object(found)


def _resolve(output_dir: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
        if not (path / COMPLETE).is_file() or not (path / STATE_FILE).is_file():
            raise SystemExit(
                f"--resume {path}: not a complete checkpoint ({COMPLETE} or {STATE_FILE} missing)"
            )
        if damage := checkpoint_damage(path):
            raise SystemExit(f"--resume {path}: damaged checkpoint: {damage}; {_others(output_dir, path)}")
        return path
    found = complete_checkpoints(output_dir)
    if not found:
        raise SystemExit(f"--resume latest: no complete checkpoint under {output_dir / CHECKPOINTS}")
    damaged = []
    for checkpoint in reversed(found):
        if (damage := checkpoint_damage(checkpoint)) is None:
            for bad, why in damaged:
                print(f"[resume] skipped the damaged checkpoint {bad.name}: {why}", flush=True)
            if damaged:
                print(f"[resume] falling back to {checkpoint}, the newest whole checkpoint", flush=True)
            return checkpoint
        damaged.append((checkpoint, damage))
    raise SystemExit(
        f"--resume latest: every checkpoint under {output_dir / CHECKPOINTS} is damaged: "
        + "; ".join(f"{c.name}: {why}" for c, why in damaged)
        + ". Start over with --overwrite_output_dir"
    )


def _others(output_dir: Path, not_this: Path) -> str:
    others = [c.name for c in complete_checkpoints(output_dir) if c.resolve() != not_this.resolve()]
    return f"pick another with --resume PATH (complete ones: {others})" if others else "no other checkpoint"


def load_checkpoint(checkpoint: Path, engines: dict[str, Any]) -> TrainerState:
    """Load every engine's state (weights, optimizer, scheduler, step counters) and the trainer state from
    `checkpoint`. Collective. The RNG states are restored separately, by `restore_rng`, at the moment
    training continues (a DataLoader draws from the torch RNG when its iterator is created)."""
    state = TrainerState(**read_json_file(checkpoint / STATE_FILE))
    if state.world_size != dist.get_world_size():
        raise SystemExit(
            f"--resume {checkpoint}: saved by {state.world_size} ranks, this run has "
            f"{dist.get_world_size()}; ZeRO shards resume on the same number of ranks only"
        )
    for name, engine in engines.items():
        try:
            path, _ = engine.load_checkpoint(str(checkpoint), tag=name)
        except Exception as e:  # DeepSpeed's torch.load of a damaged file: name the checkpoint instead
            raise SystemExit(
                f"--resume {checkpoint}: cannot read engine '{name}' ({type(e).__name__}: {e}); its files are "
                f"damaged: {_others(checkpoint.parent.parent, checkpoint)}"
            ) from None
        if path is None:
            raise SystemExit(f"--resume {checkpoint}: engine '{name}' checkpoint missing or unreadable")
    return state


def restore_rng(checkpoint: Path) -> None:
    """Set this rank's python, numpy, torch (and cuda) RNG to their state at the checkpoint."""
    rank = dist.get_rank()
    meta = json.loads((checkpoint / f"rng_rank{rank}.json").read_text())
    version, keys, pos = meta["python"]
    random.setstate((version, tuple(keys), pos))
    name, keys, *rest = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    tensors = load_file(str(checkpoint / f"rng_rank{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def data_position(
    args: argparse.Namespace, batch_flags: tuple[str, ...], **datasets: tuple[int, str]
) -> dict[str, Any]:
    """What a stage's position in its data streams depends on: the values of `batch_flags` (names of
    args), the world size, and for each named dataset its rows and content hash, e.g.
    `data_position(args, ("per_device_train_batch_size",), train=(len(data.train), data.train_sha256))`."""
    position: dict[str, Any] = {flag: getattr(args, flag) for flag in batch_flags}
    position["world_size"] = dist.get_world_size()
    for name, (rows, sha256) in datasets.items():
        position[f"{name}_rows"] = rows
        position[f"{name}_sha256"] = sha256
    return position


def _position_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    changes = []
    for key in sorted(saved.keys() & now.keys()):
        if saved[key] == now[key] or key.endswith("_rows"):
            continue
        if key.endswith("_sha256"):
            name = key.removesuffix("_sha256")
            rows = f"{name}_rows"
            changes.append(
                f"the {name} data changed ({saved.get(rows)} rows, sha256 {str(saved[key])[:12]} then; "
                f"{now.get(rows)} rows, sha256 {str(now[key])[:12]} now)"
            )
        elif key == "world_size":
            continue  # load_checkpoint says it, with what to do
        else:
            changes.append(f"--{key} was {saved[key]}, is {now[key]}")
    return changes


def resume_if_asked(
    args: argparse.Namespace, engines: dict[str, Any], stage: str, position: dict[str, Any] | None = None
) -> tuple[TrainerState, Path | None]:
    """With --resume: load the checkpoint it names into `engines`, drop train-log lines past it, and return
    (its state, its directory). Without: (a fresh state, None). `position` (`data_position`) is recorded in
    the state; a checkpoint recorded with another one is refused before anything is loaded, naming what
    changed (the skipped micro-batches would be other rows: some trained twice, some never)."""
    position = position or {}
    if args.resume is None:
        return TrainerState(world_size=dist.get_world_size(), data_position=position), None
    checkpoint = resolve_checkpoint(args.output_dir, args.resume)
    saved = read_json_file(checkpoint / STATE_FILE).get("data_position", {})
    if changes := _position_changes(saved, position):
        raise SystemExit(
            f"--resume {checkpoint}: its data position was saved under other settings: {'; '.join(changes)}. "
            "Resuming would train some rows twice and others never: resume with the same settings and data, "
            "or start over with --overwrite_output_dir"
        )
    state = load_checkpoint(checkpoint, engines)
    state.data_position = position
    truncate_train_log(args.output_dir, state.step)
    dist.print_rank0(
        f"[{stage}] resumed from {checkpoint}: step {state.step}, epoch {state.epoch + 1}, "
        f"{state.batches_in_epoch} micro-batches of it done"
    )
    return state, checkpoint


def epoch_batches(
    loader: DataLoader, epoch: int, skip: int = 0, rng_from: Path | None = None
) -> Iterator[tuple[int, Any]]:
    """(index in epoch, batch) of `epoch` of a DistributedSampler loader, from micro-batch `skip` on.

    With `rng_from`, this rank's RNG is restored from that checkpoint after the iterator is created and
    the first `skip` batches are passed over, so that the random stream matches the uninterrupted run."""
    loader.sampler.set_epoch(epoch)
    batches = iter(loader)
    for _ in range(skip):
        next(batches)
    if rng_from is not None:
        restore_rng(rng_from)
    yield from enumerate(batches, start=skip)


class BatchStream:
    """The batches of a DistributedSampler loader, epoch after epoch (reshuffled by `set_epoch`), as one
    stream that knows its position: `consumed` batches so far, `in_epoch` of them in epoch `epoch`. `BatchStream(loader, consumed=n)` continues
    where a stream that had yielded n batches stood, creating the epoch's iterator as the original did
    (a DataLoader iterator draws from the torch RNG when created: restore the RNG after positioning).
    `epochs=None` repeats forever; otherwise StopIteration after that many epochs."""

    def __init__(self, loader: DataLoader, consumed: int = 0, epochs: int | None = None):
        if len(loader) == 0:
            raise ValueError("BatchStream: the loader yields no batches")
        self.loader, self.epochs = loader, epochs
        self.consumed, self.epoch, self.in_epoch, self._batches = 0, 0, 0, None
        for _ in range(consumed):
            next(self)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        while True:
            if self._batches is None:
                if self.epochs is not None and self.epoch >= self.epochs:
                    raise StopIteration
                self.loader.sampler.set_epoch(self.epoch)
                self._batches = iter(self.loader)
            try:
                batch = next(self._batches)
            except StopIteration:
                self._batches, self.epoch, self.in_epoch = None, self.epoch + 1, 0
                continue
            self.consumed += 1
            self.in_epoch += 1
            return batch
