"""Which stages of a pipeline run and which are skipped: a stage is finished when its metrics file exists; a
stage that runs makes the later selected stages run too."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.stages import ALL_STAGES, PIPELINES, STAGES, Stage


@dataclass(frozen=True)
class PlannedStage:
    stage: Stage
    run: bool
    reason: str


def is_finished(stage: Stage, out: Path) -> bool:
    return stage.metrics_path(out).is_file()


def plan_stages(
    out: Path, steps: Sequence[int], force: bool, stages: dict[int, Stage] = STAGES
) -> list[PlannedStage]:
    """Decide, for each selected step in order, whether it runs or is skipped, and why.

    A step runs when forced, when its metrics file is missing, or when an earlier selected step runs (its
    input changes). Every step needs the outputs of the steps before it: they must be selected or finished,
    otherwise ValueError says which step to run first."""
    selected = sorted(set(steps))
    if not set(selected) <= set(stages):
        raise ValueError(f"this pipeline has steps {sorted(stages)}, not {selected}")
    plan: list[PlannedStage] = []
    upstream_runs = None
    for step in selected:
        stage = stages[step]
        for earlier in range(1, step):
            if earlier not in selected and not is_finished(stages[earlier], out):
                raise ValueError(
                    f"step {step} needs the output of step {earlier}, but "
                    f"{stages[earlier].metrics_path(out)} does not exist: add {earlier} to --step"
                )
        if force:
            plan.append(PlannedStage(stage, True, "--force"))
        elif not is_finished(stage, out):
            plan.append(PlannedStage(stage, True, f"{stage.metrics_path(out)} does not exist yet"))
        elif upstream_runs is not None:
            plan.append(PlannedStage(stage, True, f"step {upstream_runs} runs, so this step's input changes"))
        else:
            plan.append(
                PlannedStage(stage, False, f"finished: {stage.metrics_path(out)} exists (--force reruns it)")
            )
        if plan[-1].run and upstream_runs is None:
            upstream_runs = step
    return plan


def stale_after(out: Path, plan: Sequence[PlannedStage], stages: dict[int, Stage] = STAGES) -> list[Stage]:
    """Finished stages that are not selected but were made from a stage that runs: their input changes (the
    other pipelines' stages too: a rerun stage 1 makes a finished rm/, ppo/, grpo/ or dpo/ stale, a rerun
    stage 2 every stage 3)."""
    running = {p.stage for p in plan if p.run}
    selected = {p.stage for p in plan}
    stale = []
    for stage in ALL_STAGES:
        made_from = [p[n] for p in PIPELINES.values() if stage in p.values() for n in p if n < stage.step]
        if stage not in selected and running & set(made_from) and is_finished(stage, out):
            stale.append(stage)
    return stale
