"""Every launch script in dry-run mode: the printed command parses against its stage's argument parser, with
the paths of the pipeline's layout, the deployment's launcher and the ZeRO overrides; bad arguments and
missing inputs fail before anything is launched."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from pipeline import stages as pipeline_stages
from step1_sft.main import parse_args as parse_step1
from step2_dpo.args import parse_args as parse_dpo
from step2_reward.main import parse_args as parse_step2
from step3_rlhf.args import parse_args as parse_step3

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.rglob("*.sh") if p.name not in ("lib.sh", "recipes.sh"))
PARSERS = {1: parse_step1, 2: parse_step2, 3: parse_step3, "dpo": parse_dpo}
GRPO_VARIANTS = {"dapo": "grpo", "gspo": "grpo"}  # launch STEPs that run GRPO with another policy loss
MAIN = {
    1: "step1_sft/main.py",
    2: "step2_reward/main.py",
    3: "step3_rlhf/main.py",
    "dpo": "step2_dpo/main.py",
}
EXPECTED_MODELS = {
    "opt": ["1.3b", "6.7b", "13b", "30b", "66b"],
    "llama2": ["7b", "13b", "70b"],
    "qwen2.5": ["0.5b", "1.5b", "7b"],
}
CLUSTER_DEPLOYMENTS = ("single_gpu", "single_node", "multi_node")
# Families whose scripts set their stages' flags by hand (no `recipe` row), on the bundled task.
HAND_SET = {"tiny": ["single_gpu"], "smollm2": ["cpu", "single_gpu"]}


def family(script: Path) -> str:
    return script.relative_to(LAUNCH).parts[0]


def run_script(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def dry_run_commands(script: Path, *args: str) -> list[list[str]]:
    """The commands a script prints with --dry-run, as argv lists."""
    proc = run_script(script, "--dry-run", *args)  # before any '--': later words go to the stage
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert lines, f"{script} printed no command:\n{proc.stdout}"
    return [shlex.split(line[2:]) for line in lines]


def split_stage_command(argv: list[str], step: int | str) -> tuple[list[str], list[str]]:
    """(launcher words, the stage's own arguments) of a printed command."""
    assert MAIN[step] in argv, f"{MAIN[step]} not in {argv}"
    at = argv.index(MAIN[step])
    return argv[:at], argv[at + 1 :]


def declared_zero_stages(script: Path) -> tuple[int, int]:
    """(step-1 ZeRO stage, step-3 critic ZeRO stage) a script declares: the tiny script sets them itself; a
    model's script takes its row of launch/<family>/recipes.sh (multi_node the single_node row)."""
    if script.parent.name == "tiny":
        text = script.read_text()
        return tuple(
            int(re.search(rf"^{n}=(\d)$", text, re.M).group(1)) for n in ("STEP1_ZERO", "STEP3_CRITIC_ZERO")
        )
    if family(script) == "smollm2":  # hand-set in the row "SIZE/DEPLOYMENT)" of recipes.sh, up to ";;"
        recipes = (script.parent.parent / "recipes.sh").read_text()
        row = recipes.split(f"{script.parent.name}/{script.stem})", 1)[1].split(";;", 1)[0]
        return tuple(
            int(re.search(rf"^\s*{n}=(\d)$", row, re.M).group(1)) for n in ("STEP1_ZERO", "STEP3_CRITIC_ZERO")
        )
    row_key = f"{script.parent.name}/{script.stem.replace('multi_node', 'single_node')})"
    recipes = (script.parent.parent / "recipes.sh").read_text()
    row = re.search(rf"^\s+{re.escape(row_key)}\s+recipe ([\d ]+)", recipes, re.M)
    assert row, f"no row {row_key} in {script.parent.parent / 'recipes.sh'}"
    numbers = [int(n) for n in row.group(1).split()]
    return numbers[0], numbers[7]


def deployment_of(script: Path) -> str:
    return script.stem


def test_every_model_and_deployment_has_a_script():
    have = {str(p.relative_to(LAUNCH)) for p in SCRIPTS}
    want = {
        f"{fam}/{size}/{dep}.sh"
        for fam, sizes in EXPECTED_MODELS.items()
        for size in sizes
        for dep in CLUSTER_DEPLOYMENTS
    }
    want |= {f"smollm2/135m/{dep}.sh" for dep in HAND_SET["smollm2"]}
    assert want <= have, sorted(want - have)
    assert "tiny/single_gpu.sh" in have
    # the orchestrator knows every script directory, and every model it knows has its scripts
    assert {spec.launch_dir for spec in pipeline_stages.MODELS} == {
        str(p.parent.relative_to(LAUNCH)) for p in SCRIPTS
    }
    for spec in pipeline_stages.MODELS:
        deployments = HAND_SET.get(spec.family, CLUSTER_DEPLOYMENTS)
        for dep in deployments:
            assert pipeline_stages.launch_script(spec, dep).is_file()
    assert set(pipeline_stages.DEPLOYMENTS) == set(CLUSTER_DEPLOYMENTS) | {"cpu"}


# The matrices below run every launch script through bash (216 dry runs, ~30 s): the slow tier; the single
# dry runs further down keep the launch machinery in the unit tier.
@pytest.mark.slow
@pytest.mark.parametrize("step", [1, 2, 3, "dpo"])
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(LAUNCH)))
def test_dry_run_parses_with_the_stage_parser(script: Path, step: int | str, tmp_path: Path):
    out = tmp_path / "run"
    commands = dry_run_commands(script, str(step), str(out))
    launcher, stage_args = split_stage_command(commands[-1], step)
    args = PARSERS[step](stage_args)  # parse only: nothing is loaded

    deployment = deployment_of(script)
    if script.parent.name == "tiny" or deployment == "cpu":
        assert launcher == ["python"]
    elif deployment == "single_gpu":
        assert launcher[:3] == ["deepspeed", "--num_gpus", "1"]
    elif deployment == "single_node":
        assert launcher[:3] == ["deepspeed", "--num_gpus", "8"]
    else:
        assert launcher[:3] == ["deepspeed", "--hostfile", "/job/hostfile"]

    stage_dir = {1: "sft", 2: "rm", 3: "ppo", "dpo": "dpo"}[step]
    assert args.output_dir == str(out / stage_dir)
    assert args.enable_tensorboard and args.tensorboard_path == str(out / "tensorboard" / stage_dir)
    assert args.data_output_path == str(out / "data_cache")
    if step == 2:
        assert args.normalization_policy_path == str(out / "sft")
    if step == 3:
        assert args.actor_model_name_or_path == str(out / "sft")
        assert args.critic_model_name_or_path == str(out / "rm")
    if step == "dpo":  # trains the stage-1 model; its held-out answers are sampled like stage 3's
        assert args.model_name_or_path == str(out / "sft") and args.eval_num_prompts > 0
        stage3 = PARSERS[3](split_stage_command(dry_run_commands(script, "3", str(out))[-1], 3)[1])
        assert (args.max_prompt_seq_len, args.max_answer_seq_len) == (
            stage3.max_prompt_seq_len,
            stage3.max_answer_seq_len,
        )
    if family(script) == "smollm2":  # the bundled task (its gold), in the model's chat format
        assert args.data_path == [pipeline_stages.REPO.joinpath("data", "synthetic").as_posix()]
        assert args.apply_chat_template and args.data_split == "4,4,2"
        if step in (1, 2):  # the base model is materialised offline; the reward model starts from the SFT one
            base = out / "base" if step == 1 else out / "sft"
            assert args.model_name_or_path == str(base)
    elif script.parent.name != "tiny":
        assert args.data_path[0] == "Dahoas/rm-static" and args.data_split == "2,4,4"
        lora_dim = args.actor_lora_dim if step == 3 else args.lora_dim
        lora_module = args.actor_lora_module_name if step == 3 else args.lora_module_name
        if lora_dim:
            assert lora_module == ("decoder.layers." if "opt" in script.parts else "layers.")
        assert args.dtype == ("fp16" if "opt" in script.parts else "bf16")
    assert not out.exists(), "a dry run must not create anything"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(LAUNCH)))
def test_preference_steps_parse_as_dpo_with_their_loss(script: Path, tmp_path: Path):
    """STEP kto / orpo / simpo: DPO's stage and settings into OUT/<STEP> with that --loss_type; ORPO and SimPO
    with their papers' strength (their beta is not on DPO's scale), KTO with DPO's beta and as many sequences
    per step."""
    out = str(tmp_path / "run")
    dpo = PARSERS["dpo"](split_stage_command(dry_run_commands(script, "dpo", out)[-1], "dpo")[1])
    assert dpo.loss_type == "sigmoid"
    for step in [s for s in pipeline_stages.PREFERENCE if s != "dpo"]:
        args = PARSERS["dpo"](split_stage_command(dry_run_commands(script, step, out)[-1], "dpo")[1])
        assert args.loss_type == step
        assert args.output_dir == str(Path(out) / step)
        assert args.tensorboard_path == str(Path(out) / "tensorboard" / step)
        orpo = 1.0 if script.parent.name == "tiny" else 0.1  # the tiny script's lambda (its comment says why)
        assert args.beta == {"kto": dpo.beta, "orpo": orpo, "simpo": 2.0}[step]
        assert (args.learning_rate, args.max_answer_seq_len) == (dpo.learning_rate, dpo.max_answer_seq_len)
        rows_per_pair = 2 if step == "kto" else 1  # KTO's batch counts rows, a pair gives two
        assert args.per_device_train_batch_size == rows_per_pair * dpo.per_device_train_batch_size


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(LAUNCH)))
def test_critic_free_steps_parse_and_generate_as_many_answers_as_ppo(script: Path, tmp_path: Path):
    """STEP grpo / dr_grpo / rloo / reinforce_pp / reinforce_pp_baseline / dapo / gspo: stage 3 with that estimator into
    OUT/<STEP>, the reward model of OUT/rm and no critic, batches that pass stage 3's checks (the parser runs
    them) and as many answers per generation batch as PPO's row (or 4 where its batch is smaller)."""
    out = str(tmp_path / "run")
    ppo = PARSERS[3](split_stage_command(dry_run_commands(script, "3", out)[-1], 3)[1])
    for estimator in pipeline_stages.CRITIC_FREE:
        args = PARSERS[3](split_stage_command(dry_run_commands(script, estimator, out)[-1], 3)[1])
        assert args.advantage_estimator == GRPO_VARIANTS.get(estimator, estimator)
        assert args.output_dir == str(Path(out) / estimator)
        assert args.tensorboard_path == str(Path(out) / "tensorboard" / estimator)
        assert (
            args.reward_model_name_or_path == str(Path(out) / "rm") and args.critic_model_name_or_path is None
        )
        answers = args.per_device_generation_batch_size * args.num_samples_per_prompt
        assert answers == max(
            ppo.per_device_generation_batch_size, 4 if args.num_samples_per_prompt > 1 else 1
        )
        assert args.kl_in_loss == (args.advantage_estimator == "grpo")
        if estimator == "dapo":  # clip-higher, token mean, overlong punishment over the budget's last quarter
            assert (args.clip_ratio_low, args.clip_ratio_high, args.loss_agg) == (0.2, 0.28, "token_mean")
            assert args.overlong_buffer_len == args.max_answer_seq_len // 4 > 0
        elif estimator == "gspo":
            assert args.ratio_level == "sequence" and args.loss_agg == "seq_mean_token_mean"
            assert (args.clip_ratio_low, args.clip_ratio_high) == (3e-4, 4e-4)
        else:
            assert args.ratio_level == "token" and args.clip_ratio_low == args.clip_ratio_high == 0.2


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(LAUNCH)))
def test_zero_stage_overrides(script: Path, tmp_path: Path):
    out = str(tmp_path)
    assert PARSERS[1](split_stage_command(dry_run_commands(script, "1", out, "3")[-1], 1)[1]).zero_stage == 3
    assert PARSERS[2](split_stage_command(dry_run_commands(script, "2", out, "1")[-1], 2)[1]).zero_stage == 1
    args = PARSERS[3](split_stage_command(dry_run_commands(script, "3", out, "2", "1")[-1], 3)[1])
    assert (args.actor_zero_stage, args.critic_zero_stage) == (2, 1)
    dpo = split_stage_command(dry_run_commands(script, "dpo", out, "3")[-1], "dpo")[1]
    assert PARSERS["dpo"](dpo).zero_stage == 3
    # without overrides, the script's own values
    declared = declared_zero_stages(script)
    assert (
        PARSERS[1](split_stage_command(dry_run_commands(script, "1", out)[-1], 1)[1]).zero_stage
        == declared[0]
    )
    default = PARSERS[3](split_stage_command(dry_run_commands(script, "3", out, "", "")[-1], 3)[1])
    assert default.critic_zero_stage == declared[1]


def test_tiny_step1_prepares_the_tiny_model_and_takes_extra_flags(tmp_path: Path):
    script = LAUNCH / "tiny" / "single_gpu.sh"
    commands = dry_run_commands(script, "1", str(tmp_path / "o"), "--", "--num_train_epochs", "1")
    assert commands[0] == [
        "python",
        "-m",
        "tools.tiny",
        str(tmp_path / "o" / "tiny"),
        "--arch",
        "opt",
        "--seed",
        "0",
    ]
    args = PARSERS[1](split_stage_command(commands[-1], 1)[1])
    assert args.model_name_or_path == str(tmp_path / "o" / "tiny")
    assert args.num_train_epochs == 1  # the extra flag, given after the script's 3, wins
    # once the tiny model exists it is not written again
    (tmp_path / "o" / "tiny").mkdir(parents=True)
    (tmp_path / "o" / "tiny" / "config.json").write_text("{}")
    assert len(dry_run_commands(script, "1", str(tmp_path / "o"))) == 1


def test_relative_output_is_made_absolute(tmp_path: Path):
    proc = subprocess.run(
        ["bash", str(LAUNCH / "opt" / "1.3b" / "single_gpu.sh"), "1", "rel/out", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    args = PARSERS[1](split_stage_command(shlex.split(proc.stdout.splitlines()[-1][2:]), 1)[1])
    assert args.output_dir == str(tmp_path / "rel" / "out" / "sft")


def test_environment_overrides_models_and_hostfile(tmp_path: Path):
    script = LAUNCH / "llama2" / "70b" / "multi_node.sh"
    env = {"ACTOR_MODEL": "/models/llama", "REWARD_MODEL": "/models/rm", "HOSTFILE": "/etc/hosts.ds"}
    proc = run_script(script, "1", str(tmp_path), "--dry-run", env=env)
    launcher, stage_args = split_stage_command(shlex.split(proc.stdout.splitlines()[-1][2:]), 1)
    assert launcher[:3] == ["deepspeed", "--hostfile", "/etc/hosts.ds"]
    assert PARSERS[1](stage_args).model_name_or_path == "/models/llama"
    proc = run_script(script, "2", str(tmp_path), "--dry-run", env=env)
    assert PARSERS[2](
        split_stage_command(shlex.split(proc.stdout.splitlines()[-1][2:]), 2)[1]
    ).model_name_or_path == ("/models/rm")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["4", "out"],
            "STEP must be 1, 2, 3, one of dpo kto orpo simpo or one of grpo dr_grpo rloo reinforce_pp "
            "reinforce_pp_baseline dapo gspo",
        ),
        (["1"], "STEP and OUTPUT are required"),
        (["1", "out", "5"], "a ZeRO stage must be 0, 1, 2 or 3"),
        (["1", "out", "2", "2"], "CRITIC_ZERO_STAGE applies to step 3 only"),
        (["1", "out", "--zero", "3"], "unknown option --zero"),
    ],
)
def test_bad_arguments_are_refused(args: list[str], message: str, tmp_path: Path):
    proc = run_script(LAUNCH / "opt" / "1.3b" / "single_gpu.sh", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "usage:" in proc.stderr


def test_missing_inputs_and_hostfile_fail_before_launching(tmp_path: Path):
    proc = run_script(LAUNCH / "opt" / "1.3b" / "single_gpu.sh", "3", str(tmp_path / "empty"))
    assert proc.returncode == 1
    assert f"step 3 needs the stage-1 model at {tmp_path / 'empty' / 'sft' / 'config.json'}" in proc.stderr
    assert not (tmp_path / "empty").exists()

    proc = run_script(
        LAUNCH / "opt" / "66b" / "multi_node.sh",
        "1",
        str(tmp_path / "o"),
        env={"HOSTFILE": str(tmp_path / "nope")},
    )
    assert proc.returncode == 1
    assert f"hostfile {tmp_path / 'nope'} not found" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_recipe_refuses_an_unknown_option():
    """A misspelt option in a recipes.sh row stops the script instead of silently dropping the setting."""
    row = "recipe 2 8 8 2 8 8 2 2 8 4 2 sft_ofload"
    snippet = (
        f"source launch/lib.sh 1 /tmp/out; DEPLOYMENT=single_gpu DTYPE=fp16 LORA_MODULE=x RM_LR=1; {row}"
    )
    proc = subprocess.run(["bash", "-c", snippet], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown recipe option 'sft_ofload'" in proc.stderr
