"""Resume for stages 1, 2 and 3, run as a user runs them: a ZeRO-2 run (stage 3 on 2 ranks, stages 1 and 2 in
one process: their checkpoint code is the same, and one process starts in half the time) killed with SIGKILL
after its first complete checkpoint resumes with --resume and logs the same per-step losses (stage 3: losses,
rewards and KL) as an uninterrupted run of the same seed; a NaN loss stops a run without writing a
checkpoint for that step (or is skipped with --skip_nonfinite_steps); a directory holding someone else's
files is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from common.training.checkpoint import INJECT_NAN_ENV, complete_checkpoints, read_train_log
from tests.launch import REPO, _free_port, assert_no_shm_left, process_threads, run_stage

pytestmark = pytest.mark.slow  # stage runs killed and resumed

SFT = "step1_sft/main.py"
REWARD = "step2_reward/main.py"
PPO = "step3_rlhf/main.py"
# Small slices: stage 1 gets ~8 optimizer steps over 2 epochs, stage 2 ~7 in one epoch (2 ranks x 4).
SFT_ARGS = ["--data_split", "1,1,98", "--num_train_epochs", "2", "--per_device_eval_batch_size", "32"]
REWARD_ARGS = [
    "--data_split", "1,2,97",
    "--per_device_eval_batch_size", "32",
    "--eval_interval", "3",
    "--eval_iters", "1",
    "--normalization_num_samples", "16",
]  # fmt: skip
COMMON = ["--max_seq_len", "96", "--per_device_train_batch_size", "4", "--seed", "7"]


def _env() -> dict[str, str]:
    drop = (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        INJECT_NAN_ENV,
    )
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    return env


def _kill_after_first_checkpoint(
    script: str, args: list[str], out: Path, num_procs: int, timeout: float = 180
) -> None:
    """Launch `script` (on `num_procs` ranks; 1: plain python) in its own process group and SIGKILL the whole
    group as soon as a complete checkpoint exists (the kill lands wherever the run is then: training, or
    saving the next)."""
    port = _free_port()
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", str(num_procs), "--master_port", str(port), script, *args]
    env = _env()
    if num_procs == 1:
        cmd = [sys.executable, script, *args]
        env["OMP_NUM_THREADS"] = str(process_threads())
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while not complete_checkpoints(out):
            assert proc.poll() is None, f"{script} exited {proc.returncode} before its first checkpoint"
            assert time.monotonic() < deadline, f"{script}: no complete checkpoint within {timeout} s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert_no_shm_left(port)


def _compare_resumed(
    script: str,
    base: list[str],
    tmp_path: Path,
    metrics_file: str,
    log_keys: tuple[str, ...] = ("loss",),
    num_procs: int = 2,
):
    """Run `script` uninterrupted, and killed after its first checkpoint then resumed; compare the train
    logs' `log_keys` step by step. Returns both runs' metrics files."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_stage(script, [*base, "--output_dir", str(full)], num_procs=num_procs)
    _kill_after_first_checkpoint(script, [*base, "--output_dir", str(killed)], killed, num_procs)
    assert not (killed / metrics_file).exists(), "the run finished before it was killed: nothing tested"
    resumed_at = complete_checkpoints(killed)[-1].name
    log = run_stage(script, [*base, "--output_dir", str(killed), "--resume"], num_procs=num_procs)
    assert f"resumed from {killed / 'checkpoints' / resumed_at}" in log

    expected, got = read_train_log(full), read_train_log(killed)
    assert [r["step"] for r in got] == [r["step"] for r in expected], (got, expected)
    for a, b in zip(got, expected, strict=True):
        for key in log_keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
    return json.loads((full / metrics_file).read_text()), json.loads((killed / metrics_file).read_text())


def _stage_base(tiny_dir: Path, tmp_path: Path, stage_args: list[str]) -> list[str]:
    base = ["--model_name_or_path", str(tiny_dir), "--data_output_path", str(tmp_path / "cache")]
    return [*base, "--zero_stage", "2", "--save_interval", "2", *COMMON, *stage_args]


def test_sft_sigkill_resume_matches_uninterrupted_run(tiny_dir, tmp_path):
    base = _stage_base(tiny_dir, tmp_path, SFT_ARGS)
    full, resumed = _compare_resumed(SFT, base, tmp_path, "sft_metrics.json", num_procs=1)
    assert full["optimizer_steps"] == resumed["optimizer_steps"] >= 6
    assert resumed["perplexity_per_epoch"] == pytest.approx(full["perplexity_per_epoch"], rel=1e-5)


def test_reward_sigkill_resume_matches_uninterrupted_run(tiny_dir, tmp_path):
    base = _stage_base(tiny_dir, tmp_path, REWARD_ARGS)
    full, resumed = _compare_resumed(REWARD, base, tmp_path, "rm_metrics.json", num_procs=1)
    assert full["optimizer_steps"] == resumed["optimizer_steps"] >= 5
    assert [c["step"] for c in resumed["eval_curve"]] == [c["step"] for c in full["eval_curve"]]
    assert resumed["final"]["accuracy"] == pytest.approx(full["final"]["accuracy"])
    assert resumed["final"]["loss"] == pytest.approx(full["final"]["loss"], rel=1e-5)


def _plain_run(script: str, args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**_env(), **env_extra}
    return subprocess.run(
        [sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def _plain_args(tiny_dir: Path, out: Path, tmp_path: Path) -> list[str]:
    """A one-model stage on the tiny default into `out`, its data cache in `tmp_path`."""
    return [
        "--model_name_or_path",
        str(tiny_dir),
        "--output_dir",
        str(out),
        "--data_output_path",
        str(tmp_path),
    ]


def test_sft_nan_loss_stops_without_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "sft_nan"
    args = _plain_args(tiny_dir, out, tmp_path)
    proc = _plain_run(SFT, [*args, *COMMON, *SFT_ARGS, "--save_interval", "1"], {INJECT_NAN_ENV: "3"})
    assert proc.returncode != 0
    assert "[sft] step 3: non-finite loss" in proc.stdout + proc.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["step_1", "step_2"]
    assert not list((out / "checkpoints").glob("step_3*"))
    assert not (out / "sft_metrics.json").exists()


def test_reward_nan_loss_skipped_and_counted(tiny_dir, tmp_path):
    out = tmp_path / "rm_nan"
    args = _plain_args(tiny_dir, out, tmp_path)
    proc = _plain_run(REWARD, [*args, *COMMON, *REWARD_ARGS, "--skip_nonfinite_steps"], {INJECT_NAN_ENV: "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "rm_metrics.json").read_text())
    assert metrics["skipped_nonfinite_steps"] == 1
    assert all(map(lambda r: r["loss"] == r["loss"], read_train_log(out)))  # no NaN got into training


@pytest.fixture(scope="module")
def ppo_models(tiny_dir, tmp_path_factory) -> list[str]:
    """Stage-3 model flags: the tiny default as actor, a reward model with a fresh head on it as critic
    and reward model (what PPO learns does not matter here, only that a resumed run repeats it)."""
    from common.models.loading import load_tokenizer
    from common.models.reward_model import load_reward_model_for_training
    from common.models.saving import save_reward_model

    rm_dir = tmp_path_factory.mktemp("ppo_rm") / "rm"
    tok = load_tokenizer(str(tiny_dir))
    save_reward_model(load_reward_model_for_training(str(tiny_dir), tok), rm_dir, tok, 0)
    return ["--actor_model_name_or_path", str(tiny_dir), "--critic_model_name_or_path", str(rm_dir)]


def _ppo_args(ppo_models: list[str], tmp_path: Path, iterations: int) -> list[str]:
    return [
        *ppo_models,
        "--data_output_path", str(tmp_path / "cache"),
        "--data_split", "1,1,98",
        "--per_device_generation_batch_size", "4",
        "--per_device_training_batch_size", "2",
        "--ppo_epochs", "2",
        "--max_prompt_seq_len", "32",
        "--max_answer_seq_len", "12",
        "--eval_num_prompts", "8",
        "--enable_test_mode", "--test_stop_step", str(iterations),
        "--seed", "7",
    ]  # fmt: skip


@pytest.mark.distributed
def test_ppo_sigkill_resume_matches_uninterrupted_run(ppo_models, tmp_path):
    """Actor and critic under ZeRO-2 on 2 ranks, with an EMA actor and the adaptive KL controller, so
    that optimizer, EMA, KL-coefficient, minibatch-permutation and sampling-RNG state must all resume."""
    base = [*_ppo_args(ppo_models, tmp_path, 6), "--actor_zero_stage", "2", "--critic_zero_stage", "2"]
    base += ["--save_interval", "2", "--enable_ema", "--adaptive_kl"]
    keys = ("score", "kl", "policy_loss", "value_loss")
    full, resumed = _compare_resumed(PPO, base, tmp_path, "ppo_metrics.json", keys)
    assert [h["step"] for h in resumed["history"]] == list(range(1, 7))
    assert [h["kl_coef"] for h in resumed["history"]] == pytest.approx(
        [h["kl_coef"] for h in full["history"]]
    )
    assert len({h["kl_coef"] for h in full["history"]}) > 1  # the controller did move
    assert resumed["after"] == pytest.approx(full["after"], rel=1e-5)
    # the stage-1 policy's held-out answers come back from the checkpoint; the PPO policy's are the same
    answers = [
        [json.loads(line) for line in (tmp_path / run / "heldout_answers.jsonl").read_text().splitlines()]
        for run in ("full", "killed")
    ]
    assert [(r["prompt"], r["before"], r["after"]) for r in answers[0]] == [
        (r["prompt"], r["before"], r["after"]) for r in answers[1]
    ]
    for model in ("actor", "actor_ema"):
        a = load_file(str(tmp_path / "full" / model / "model.safetensors"))
        b = load_file(str(tmp_path / "killed" / model / "model.safetensors"))
        assert all((a[k] - b[k]).abs().max() <= 1e-5 for k in a), model


def test_critic_free_sigkill_resume_matches_uninterrupted_run(ppo_models, tmp_path):
    """RLOO (2 answers per prompt, KL as a loss term) with the reward model plus the gold as reward function,
    one process: a checkpoint holds the actor alone, and the resumed run repeats the uninterrupted one."""
    base = [*_ppo_args(ppo_models, tmp_path, 4), "--save_interval", "2"]
    base += [
        "--advantage_estimator",
        "rloo",
        "--num_samples_per_prompt",
        "2",
        "--per_device_generation_batch_size",
        "2",
    ]
    base += [
        "--kl_in_loss",
        "--reward_fn",
        "common.evaluation.gold:synthetic_gold",
        "--reward_fn_coef",
        "0.5",
    ]
    keys = ("score", "kl", "policy_loss")
    full, resumed = _compare_resumed(PPO, base, tmp_path, "ppo_metrics.json", keys, num_procs=1)
    assert [h["step"] for h in resumed["history"]] == list(range(1, 5))
    assert all("kl_loss" in h and "value_loss" not in h for h in resumed["history"])
    assert resumed["after"] == pytest.approx(full["after"], rel=1e-5)
    checkpoint = complete_checkpoints(tmp_path / "killed")[-1]
    assert (checkpoint / "actor").is_dir() and not (checkpoint / "critic").exists()
    assert not (tmp_path / "killed" / "critic").exists()
    a = load_file(str(tmp_path / "full" / "actor" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "actor" / "model.safetensors"))
    assert all((a[k] - b[k]).abs().max() <= 1e-5 for k in a)


def test_ppo_nan_loss_stops_without_checkpoint(ppo_models, tmp_path):
    out = tmp_path / "ppo_nan"
    args = [*_ppo_args(ppo_models, tmp_path, 4), "--output_dir", str(out), "--save_interval", "1"]
    proc = _plain_run(PPO, args, {INJECT_NAN_ENV: "2"})
    assert proc.returncode != 0
    assert "[ppo] step 2: non-finite actor loss" in proc.stdout + proc.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["step_1"]
    assert not list((out / "checkpoints").glob("step_2*"))
    assert not (out / "ppo_metrics.json").exists() and not (out / "actor").exists()


def test_ppo_nan_loss_skipped_and_counted(ppo_models, tmp_path):
    out = tmp_path / "ppo_skip"
    args = [*_ppo_args(ppo_models, tmp_path, 3), "--output_dir", str(out), "--skip_nonfinite_steps"]
    proc = _plain_run(PPO, args, {INJECT_NAN_ENV: "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "ppo_metrics.json").read_text())
    assert metrics["skipped_nonfinite_microbatches"] == {"actor": 1, "critic": 0}
    log = read_train_log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r[k] == r[k] for r in log for k in ("policy_loss", "value_loss"))  # no NaN got through


@pytest.mark.parametrize("script", [SFT, PPO])
def test_stage_refuses_foreign_output_dir(script, tiny_dir, ppo_models, tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "results.csv").write_text("precious")
    models = ppo_models if script == PPO else ["--model_name_or_path", str(tiny_dir)]
    proc = _plain_run(script, [*models, "--output_dir", str(out)], {})
    assert proc.returncode != 0 and "--overwrite_output_dir" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"]
