"""Running one stage through its launch script: the command, the environment, the subprocess with its
console lines and training.log, the help printed when it fails, and stage_run.json."""

from __future__ import annotations

import collections
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pipeline.stages import CONSOLE_LINE, REPO, RUN_RECORD, ModelSpec, Stage


@dataclass
class StageRun:
    """One stage's launch: the command, its environment and where its log goes."""

    step: int
    command: list[str]
    env: dict[str, str]
    log_path: Path
    verbose: bool = False
    prefix: str = ""  # put before every echoed line (several seeds' stages at once)
    output_tail: list[str] = field(default_factory=list)


Runner = Callable[[StageRun], int]


def run_subprocess(run: StageRun) -> int:
    """Run a launch script from the repository root, echo its progress lines (all lines when verbose) and
    keep its last lines in run.output_tail. Returns the exit status."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(
        run.command, cwd=REPO, env=run.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            shown = CONSOLE_LINE.search(line)
            if run.verbose:
                print(run.prefix + line, flush=True)
            elif shown:
                print(run.prefix + line[shown.start() :], flush=True)
        status = proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        status = 130
    run.output_tail = list(tail)
    return status


def stage_command(
    script: Path,
    step: int | str,
    out: Path,
    zero_stage: str,
    critic_zero_stage: str,
    dry_run: bool,
    extra: Sequence[str],
) -> list[str]:
    """`bash SCRIPT STEP OUT [ZERO [CRITIC_ZERO]] [--dry-run] [-- EXTRA...]` ('' ZeRO = the script's value)."""
    command = ["bash", str(script), str(step), str(out), zero_stage]
    if str(step) == "3":
        command.append(critic_zero_stage)
    if dry_run:
        command.append("--dry-run")
    if extra:
        command += ["--", *extra]
    return command


def stage_env(actor: ModelSpec, reward_model: str) -> dict[str, str]:
    """The environment of a launch script: this interpreter's directory first on PATH (so the scripts'
    `python` and `deepspeed` are this environment's), REWARD_MODEL when it is not the script's default."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    if reward_model not in (actor.reward_model, "tiny"):
        env["REWARD_MODEL"] = reward_model
    return env


def failure_help(stage: Stage, run: StageRun, status: int) -> str:
    lines = [
        f"step {stage.step} ({stage.title}) failed with exit status {status}.",
        f"command: {shlex.join(run.command)}",
        f"full log: {run.log_path}",
        "last lines of its output:",
        *("    " + line for line in run.output_tail[-25:]),
        "If it ran out of memory: lower the per-device batch sizes (raise --gradient_accumulation_steps to keep the",
        "effective batch), raise the ZeRO stage (--actor-zero-stage / --reward-zero-stage), add --offload,",
        "gradient checkpointing or LoRA; see docs/operations.md, Troubleshooting.",
    ]
    return "\n".join(lines)


def write_run_record(stage: Stage, out: Path, command: Sequence[str], seconds: float) -> None:
    record = {
        "step": stage.step,
        "seconds": round(seconds, 1),
        "command": list(command),
        "finished_at": datetime.now().isoformat(timespec="seconds"),
    }
    (stage.dir(out) / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
