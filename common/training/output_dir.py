"""The output-directory guard of every stage.

Output directory: `check_output_dir` (before any compute, writes nothing) refuses a directory holding
files this project did not write, another stage's run, or this stage's checkpoints or model when neither
--resume nor --overwrite_output_dir is given, and, even with --overwrite_output_dir, one where a file this
project did not write has a name the stage writes; `claim_output_dir` then writes the marker. Nothing is
replaced or deleted that the project did not write.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from common import dist
from common.files import (
    MODEL_FILES,
    STAGING,
    is_model_file,
)
from common.training.checkpoint import (
    CHECKPOINTS,
    COMPLETE,
    STATE_FILE,
    STEP_DIR,
    TRAIN_LOG,
    complete_checkpoints,
)

RUN_MARKER = ".rlhf_run.json"
# Files a launch script or the e2e orchestrator writes into a stage's directory before the stage starts.
LAUNCHER_FILES = frozenset({"training.log", "stage_run.json"})


def _marker(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / RUN_MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not valid JSON ({e}); remove it or pick another --output_dir") from None


HF_MODEL_FILES = MODEL_FILES  # the files the model writers may overwrite
# Names a stage writes at its output directory's root besides model files (stage 3: models in sub-directories).
STAGE_FILES = frozenset(
    {RUN_MARKER, TRAIN_LOG, CHECKPOINTS, "tensorboard", STAGING, "actor", "actor_ema", "critic"}
    | {f"{name}_metrics.json" for name in ("sft", "rm", "ppo", "dpo")}
    | {"heldout_answers.jsonl", "normalization_sample.jsonl"}
)


def refuse_foreign_files(out: Path, own_files: frozenset[str], writer: str) -> None:
    """FileExistsError unless `out` is missing or a directory holding only files `writer` writes itself (its
    own earlier output, which it may overwrite): a model writer never mixes its files with someone else's."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in own_files)
    if foreign:
        raise FileExistsError(f"{out} is not empty and holds files {writer} did not write: {foreign}")


def check_output_dir(output_dir: str | Path, stage: str, args: argparse.Namespace) -> None:
    """Refuse (SystemExit naming the directory) to write into a directory holding someone else's files
    or another run's checkpoints. Writes nothing: call it before any compute, `claim_output_dir` later.

    Allowed: a missing or empty directory (files of LAUNCHER_FILES aside); this stage's earlier run with
    --resume, or when it left neither complete checkpoints nor a model; with --overwrite_output_dir, a run
    of ours (its files are replaced), or someone else's files when none has a name this stage writes (ours
    go beside them: a file we did not write is never replaced). `--resume auto` becomes 'latest' when a complete checkpoint of this stage is
    there and None (a fresh start) otherwise: `args.resume` is set accordingly. Rank 0 decides; every rank
    gets the same verdict."""
    if args.resume == "auto":
        found = bool(complete_checkpoints(output_dir)) and _is_stage_dir(Path(output_dir), stage)
        args.resume = "latest" if dist.broadcast_object(found if dist.is_rank0() else None) else None
    error = _output_dir_error(Path(output_dir), stage, args) if dist.is_rank0() else None
    error = dist.broadcast_object(error)
    if error:
        raise SystemExit(error)


def claim_output_dir(output_dir: str | Path, stage: str, args: argparse.Namespace) -> None:
    """Create the directory and mark it as this stage's (RUN_MARKER, with the command). A run that does not
    resume first removes our own earlier checkpoints and train log there, nothing else. Collective."""
    out = Path(output_dir)
    if dist.is_rank0():
        if args.resume is None and out.is_dir():
            _start_fresh(out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"stage": stage, "command": sys.argv, "world_size": dist.get_world_size()}
        (out / RUN_MARKER).write_text(json.dumps(record, indent=2) + "\n")
    dist.barrier()


def _is_stage_dir(out: Path, stage: str) -> bool:
    marker = _marker(out)
    return marker is not None and marker.get("stage") == stage


def _output_dir_error(out: Path, stage: str, args: argparse.Namespace) -> str | None:
    resume_latest = args.resume == "latest"
    if not out.exists():
        return f"--resume latest: {out} does not exist" if resume_latest else None
    if not out.is_dir():
        return f"--output_dir {out}: exists and is not a directory"
    marker = _marker(out)
    others = [p.name for p in out.iterdir() if p.name not in LAUNCHER_FILES and p.name != RUN_MARKER]
    own = marker is not None and marker.get("stage") == stage
    if resume_latest:
        if not own:
            return f"--resume: {out} holds no earlier run of stage {stage} ({RUN_MARKER} missing or other)"
        return None
    if not others:
        return None
    if marker is None:  # nothing there is ours: --overwrite_output_dir may add our files, never replace one
        ours = sorted(n for n in others if is_model_file(n) or n in STAGE_FILES)
        if ours:
            return (
                f"--output_dir {out} holds files this project did not write, and this stage would replace "
                f"some of them ({', '.join(ours[:5])}): pick another directory (--overwrite_output_dir never "
                "replaces files the project did not write)"
            )
        if args.overwrite_output_dir:
            return None
        return (
            f"--output_dir {out} is not empty ({', '.join(sorted(others)[:5])}) and holds files this project did "
            "not write: pick another directory, or pass --overwrite_output_dir to write this stage's files "
            "beside them (none of them is replaced or deleted)"
        )
    if args.overwrite_output_dir:
        return None
    if not own:
        return (
            f"--output_dir {out} holds a run of stage {marker.get('stage')!r}: pick another directory, or pass "
            "--overwrite_output_dir to replace its files with this stage's"
        )
    if args.resume is None and complete_checkpoints(out):
        return (
            f"--output_dir {out} holds checkpoints of an earlier {stage} run: pass --resume to "
            "continue it or --overwrite_output_dir to start over (removes those checkpoints)"
        )
    if args.resume is None and _holds_model(out):
        return (
            f"--output_dir {out} holds the model of an earlier {stage} run: pass --overwrite_output_dir to "
            "replace it (the earlier model stays until the new one is completely written) or pick another "
            "directory"
        )
    return None


def _holds_model(out: Path) -> bool:
    """A stage's saved model: config.json at the root (stages 1, 2, DPO) or in actor/ (stage 3)."""
    return (out / "config.json").is_file() or (out / "actor" / "config.json").is_file()


def _start_fresh(out: Path) -> None:
    """A run that does not resume: remove what an earlier run of ours left that would be mistaken for
    this run's (checkpoints, the per-step log). Only files of the names we write are touched."""
    root = out / CHECKPOINTS
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and _is_own_checkpoint_dir(d):
                shutil.rmtree(d)
    if (out / TRAIN_LOG).is_file():
        (out / TRAIN_LOG).unlink()


def _is_own_checkpoint_dir(d: Path) -> bool:
    """step_<N>.tmp, or step_<N> holding our trainer state or marker."""
    if d.name.endswith(".tmp"):
        return bool(STEP_DIR.match(d.name.removesuffix(".tmp")))
    return bool(STEP_DIR.match(d.name)) and ((d / STATE_FILE).is_file() or (d / COMPLETE).is_file())
