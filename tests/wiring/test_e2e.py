"""The orchestrator e2e_rlhf.py: which stages run or are skipped (with an injected runner that plays the
stages), the commands it hands the launch scripts, the summary table, and the DPO pipeline beside the PPO
one. The real run of the tiny default through the real launch script, skipping its finished stages, is
tests/runs/test_gold_pipeline.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import e2e_rlhf
from common.evaluation.metrics import AnswerEval
from pipeline import report as pipeline_report
from pipeline import run as pipeline_run
from pipeline import stages as pipeline_stages
from pipeline.run import StageRun
from pipeline.stages import STAGES

REPO = Path(__file__).resolve().parents[2]
TINY_SCRIPT = REPO / "launch" / "tiny" / "single_gpu.sh"

FAKE_METRICS = {
    1: {"perplexity_per_epoch": [120.5, 30.25, 18.0], "optimizer_steps": 9},
    2: {
        "eval_curve": [
            {"step": 0, "accuracy": 0.5, "pairs": 300},
            {"step": 4, "accuracy": 0.8, "pairs": 300},
        ],
        "final": {"accuracy": 0.8, "pairs": 300},
    },
    3: {
        "before": {
            "score": 0.25,
            "response_length": 12.0,
            "eos_fraction": 1.0,
            "repeated_3gram_rate": 0.0,
            "distinct_2": 0.5,
            "leaked_turn_markers": 0.0,
            "gold_mean": 0.5,
            "gold_share_best": 0.25,
            "gold_share_malformed": 0.0,
        },
        "after": {
            "score": 1.5,
            "response_length": 20.0,
            "eos_fraction": 0.9,
            "repeated_3gram_rate": 0.125,
            "distinct_2": 0.25,
            "leaked_turn_markers": 0.5,
            "gold_mean": -0.25,
            "gold_share_best": 0.0,
            "gold_share_malformed": 0.75,
        },
        "score_gain": 1.25,
        "gold_gain": -0.75,
        "gold_reward": "common.evaluation.gold:synthetic_gold",
        "final_kl": 4.5,
        "evals": [
            {"step": 0, "score": 0.25, "response_length": 12.0},
            {"step": 2, "score": 1.5, "response_length": 20.0},
        ],
        "history": [
            {"step": 1, "score_mean": 0.3, "kl": 0.0, "response_length": 13.0},
            {"step": 2, "score_mean": 1.1, "kl": 4.5, "response_length": 18.0},
        ],
    },
}


_ANSWERS = {"response_length": 12.0, "eos_fraction": 1.0, "repeated_3gram_rate": 0.0, "distinct_2": 0.5}
FAKE_METRICS["dpo"] = {
    "before": {
        "accuracy": 0.0,
        "margin": 0.0,
        "kl": 0.0,
        "gold_mean": 0.5,
        "gold_share_best": 0.25,
        **_ANSWERS,
    },
    "after": {
        "accuracy": 0.75,
        "margin": 1.5,
        "kl": 3.25,
        "gold_mean": 0.625,
        "gold_share_best": 0.5,
        **_ANSWERS,
    },
    "gold_reward": "common.evaluation.gold:synthetic_gold",
    "final_kl": 3.25,
}


def stage_of(run: StageRun) -> pipeline_stages.Stage:
    """The stage a launch-script call runs: its STEP argument (1, 2, 3, dpo or a critic-free estimator)."""
    return next(s for s in pipeline_stages.ALL_STAGES if s.launch_arg == run.command[2])


class FakeStages:
    """Plays the launch scripts: records each call and, unless told to fail, writes the step's metrics file
    as the real stage does when it finishes (nothing in dry-run mode)."""

    def __init__(self, out: Path, fail_step: int | None = None, status: int = 3, write_metrics: bool = True):
        self.out, self.fail_step, self.status, self.write_metrics = out, fail_step, status, write_metrics
        self.calls: list[tuple[int, list[str], bool]] = []  # step, command, metrics existed at call time

    def __call__(self, run: StageRun) -> int:
        stage = stage_of(run)
        self.calls.append((run.step, run.command, stage.metrics_path(self.out).exists()))
        if run.step == self.fail_step:
            run.output_tail = ["Traceback (most recent call last):", "RuntimeError: CUDA out of memory"]
            return self.status
        if "--dry-run" not in run.command:
            stage.dir(self.out).mkdir(parents=True, exist_ok=True)
            (stage.dir(self.out) / "training.log").write_text(f"step {run.step}\n")
            if self.write_metrics:
                metrics = FAKE_METRICS["dpo" if stage.name in pipeline_stages.PREFERENCE else run.step]
                stage.metrics_path(self.out).write_text(json.dumps(metrics))
        return 0

    @property
    def steps(self) -> list[int]:
        return [step for step, _, _ in self.calls]


def stale_note(stage_dir: Path, rerun: str) -> str:
    """The note e2e_rlhf prints for a finished stage whose inputs a run replaced."""
    return f"note: {stage_dir} was made from the previous outputs of earlier steps; rerun it with {rerun}"


def run_main(out: Path, *flags: str, fake: FakeStages | None = None) -> tuple[int, FakeStages]:
    fake = fake or FakeStages(out)
    return e2e_rlhf.main(["--tiny", "--output-dir", str(out), *flags], runner=fake), fake


@pytest.mark.slow
def test_fresh_run_runs_every_step_then_a_rerun_skips_them(tmp_path, capsys):
    status, fake = run_main(tmp_path)
    assert status == 0 and fake.steps == [1, 2, 3]
    assert not any(existed for _, _, existed in fake.calls)
    for step, command, _ in fake.calls:
        assert command[:4] == ["bash", str(TINY_SCRIPT), str(step), str(tmp_path)]
        record = json.loads((STAGES[step].dir(tmp_path) / pipeline_stages.RUN_RECORD).read_text())
        assert record["command"] == command and record["seconds"] >= 0
    assert (tmp_path / "ppo" / "ppo_curves.png").is_file()
    first = capsys.readouterr().out
    assert "stage 1: held-out perplexity before -> after       120.50 -> 18.00" in first
    assert "PPO curves:    " + str(tmp_path / "ppo" / "ppo_curves.png") in first

    status, fake = run_main(tmp_path)
    assert status == 0 and fake.steps == []  # no stage process started
    second = capsys.readouterr().out
    for stage in STAGES.values():
        assert f"skipped, finished: {stage.metrics_path(tmp_path)} exists (--force reruns it)" in second
    assert "(earlier run)" in second and "stage 3: PPO policy scores higher" in second


def test_force_reruns_the_selected_step_only_and_flags_later_outputs(tmp_path, capsys):
    run_main(tmp_path)
    record_2 = (tmp_path / "rm" / pipeline_stages.RUN_RECORD).read_text()
    capsys.readouterr()
    status, fake = run_main(tmp_path, "--force", "--step", "1")
    assert status == 0 and fake.steps == [1]
    assert fake.calls[0][2] is False  # the old metrics file was removed before the rerun
    assert (tmp_path / "rm" / pipeline_stages.RUN_RECORD).read_text() == record_2
    out = capsys.readouterr().out
    assert f"note: {tmp_path / 'rm'} was made from the previous outputs" in out
    assert f"note: {tmp_path / 'ppo'} was made from the previous outputs" in out


@pytest.mark.slow
def test_a_step_that_runs_makes_the_later_selected_steps_run(tmp_path, capsys):
    run_main(tmp_path)
    (tmp_path / "sft" / "sft_metrics.json").unlink()
    status, fake = run_main(tmp_path)
    assert status == 0 and fake.steps == [1, 2, 3]
    out = capsys.readouterr().out
    assert "step 1 runs, so this step's input changes" in out
    # a later step alone, with earlier ones finished, runs alone
    (tmp_path / "ppo" / "ppo_metrics.json").unlink()
    status, fake = run_main(tmp_path)
    assert fake.steps == [3]


def test_a_step_needs_the_earlier_outputs(tmp_path, capsys):
    fake = FakeStages(tmp_path)
    with pytest.raises(
        SystemExit, match=r"step 3 needs the output of step 1, but .*sft_metrics.json does not exist"
    ):
        run_main(tmp_path, "--step", "3", fake=fake)
    assert fake.steps == []
    run_main(tmp_path, "--step", "1", fake=fake)
    with pytest.raises(SystemExit, match="step 3 needs the output of step 2"):
        run_main(tmp_path, "--step", "3", fake=fake)
    status, fake = run_main(tmp_path, "--step", "2", "3")
    assert status == 0 and fake.steps == [2, 3]


def test_a_failed_step_stops_the_pipeline_and_says_where_to_look(tmp_path, capsys):
    status, fake = run_main(tmp_path, fake=FakeStages(tmp_path, fail_step=2, status=7))
    assert status == 7 and fake.steps == [1, 2]
    err = capsys.readouterr().err
    assert "step 2 (reward model) failed with exit status 7." in err
    assert f"full log: {tmp_path / 'rm' / 'training.log'}" in err
    assert "RuntimeError: CUDA out of memory" in err
    assert not (tmp_path / "rm" / "rm_metrics.json").exists()
    assert not (tmp_path / "rm" / pipeline_stages.RUN_RECORD).exists()
    status, fake = run_main(tmp_path)  # the next run resumes at step 2
    assert status == 0 and fake.steps == [2, 3]


def test_a_step_that_exits_0_without_metrics_is_an_error(tmp_path, capsys):
    status, fake = run_main(tmp_path, fake=FakeStages(tmp_path, write_metrics=False))
    assert status == 1 and fake.steps == [1]
    assert "exited 0 but wrote no" in capsys.readouterr().out


def test_commands_carry_zero_stages_extra_flags_and_dry_run(tmp_path, capsys):
    fake = FakeStages(tmp_path)
    status = e2e_rlhf.main(
        [
            "--actor-model", "1.3b", "--output-dir", str(tmp_path), "--dry-run", "--actor-zero-stage", "3",
            "--reward-zero-stage", "1", "--step2-args=--print_loss --eval_interval 5",
        ],
        runner=fake,
    )  # fmt: skip
    script = str(REPO / "launch" / "opt" / "1.3b" / "single_gpu.sh")
    assert status == 0
    assert [c for _, c, _ in fake.calls] == [
        ["bash", script, "1", str(tmp_path), "3", "--dry-run"],
        ["bash", script, "2", str(tmp_path), "1", "--dry-run", "--", "--print_loss", "--eval_interval", "5"],
        ["bash", script, "3", str(tmp_path), "3", "1", "--dry-run"],
    ]
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_model_names_and_reward_models():
    spec = pipeline_stages.resolve_actor("facebook/opt-1.3b")
    for alias in ("1.3b", "opt-1.3b", "FACEBOOK/OPT-1.3B", "opt/1.3b"):
        assert pipeline_stages.resolve_actor(alias) == spec
    assert pipeline_stages.resolve_actor("Llama-2-13b-hf").launch_dir == "llama2/13b"
    assert pipeline_stages.resolve_actor("qwen/qwen2.5-7b").reward_model == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(SystemExit, match="no launch scripts for it"):
        pipeline_stages.resolve_actor("gpt2")

    assert pipeline_stages.resolve_reward(None, spec) == "facebook/opt-350m"
    assert pipeline_stages.resolve_reward("350m", spec) == "facebook/opt-350m"
    assert pipeline_stages.resolve_reward("opt-1.3b", spec) == "facebook/opt-1.3b"
    assert pipeline_stages.resolve_reward("/models/my-rm", spec) == "/models/my-rm"
    with pytest.raises(SystemExit, match="stage 3 needs the reward model to use the actor's tokenizer"):
        pipeline_stages.resolve_reward("Qwen/Qwen2.5-0.5B", spec)
    with pytest.raises(SystemExit, match="tiny default trains its reward model from the SFT model"):
        pipeline_stages.resolve_reward("opt-350m", pipeline_stages.resolve_actor("tiny"))

    assert "REWARD_MODEL" not in pipeline_run.stage_env(spec, "facebook/opt-350m")
    env = pipeline_run.stage_env(spec, "/models/my-rm")
    assert env["REWARD_MODEL"] == "/models/my-rm"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    with pytest.raises(SystemExit, match="no launch script launch/tiny/multi_node.sh"):
        pipeline_stages.launch_script(pipeline_stages.resolve_actor("tiny"), "multi_node")


def test_summary_rows(tmp_path):
    for step, stage in STAGES.items():
        stage.dir(tmp_path).mkdir()
        stage.metrics_path(tmp_path).write_text(json.dumps(FAKE_METRICS[step]))
    (tmp_path / "sft" / pipeline_stages.RUN_RECORD).write_text(json.dumps({"seconds": 61.4}))
    (tmp_path / "ppo" / pipeline_stages.RUN_RECORD).write_text(json.dumps({"seconds": 125.0}))
    rows = dict(pipeline_report.summary_rows(tmp_path, ran={"ppo"}))
    assert rows == {
        "stage 1: held-out perplexity before -> after": "120.50 -> 18.00",
        "stage 2: held-out pairwise accuracy": "0.800 (300 pairs)",
        "stage 3: held-out RM score, stage-1 policy": "+0.250",
        "stage 3: held-out RM score, PPO policy": "+1.500",
        "stage 3: PPO policy scores higher": "yes (+1.250 normalised units)",
        "stage 3: final KL to the reference (per sequence)": "4.500",
        "stage 3: held-out gold score before -> after": "+0.500 -> -0.250 (common.evaluation.gold:synthetic_gold)",
        "stage 3: held-out best share": "0.25 -> 0.00",
        "stage 3: held-out malformed share": "0.00 -> 0.75",
        "stage 3: proxy vs gold": "REWARD HACKING: the proxy rose but the gold did not (proxy +1.250, gold -0.750)",
        "stage 3: share of answers ending in EOS": "1.000 -> 0.900",
        "stage 3: mean answer length (tokens)": "12.000 -> 20.000",
        "stage 3: repeated 3-gram rate": "0.000 -> 0.125",
        "stage 3: distinct-2": "0.500 -> 0.250",
        "stage 3: share with leaked turn markers": "0.000 -> 0.500",
        "wall time: step 1 (supervised fine-tuning)": "61 s (1:01)  (earlier run)",
        "wall time: step 3 (PPO)": "125 s (2:05)",
        "wall time: all stages": "186 s (3:06)",
    }
    worse = {**FAKE_METRICS[3], "after": {"score": 0.0}, "score_gain": -0.25}
    for key in ("gold_gain", "gold_reward"):  # metrics of a run without a gold (or from before it existed)
        del worse[key]
    STAGES[3].metrics_path(tmp_path).write_text(json.dumps(worse))
    rows = dict(pipeline_report.summary_rows(tmp_path))
    assert rows["stage 3: PPO policy scores higher"] == "NO (-0.250 normalised units)"
    assert not any("gold" in label or "distinct" in label for label in rows)


def test_a_collapse_of_the_answers_is_flagged_whatever_the_means_say():
    """distinct-2 falling below half (SmolLM2's CPU run: 0.415 -> 0.074, gold and proxy both up) gets its own
    row; half or more (the tiny demo: 0.307 -> 0.280) does not."""
    rows = dict(
        pipeline_report.measure_rows("stage 3", AnswerEval(distinct_2=0.415), AnswerEval(distinct_2=0.074))
    )
    assert rows["stage 3: answer diversity"] == "COLLAPSED: distinct-2 fell 82%; read the held-out answers"
    for after in (0.280, 0.2075):
        assert "stage 3: answer diversity" not in dict(
            pipeline_report.measure_rows(
                "stage 3", AnswerEval(distinct_2=0.415), AnswerEval(distinct_2=after)
            )
        )


@pytest.mark.slow
def test_dpo_pipeline_reuses_a_finished_stage_1_and_reports_beside_ppo(tmp_path, capsys):
    run_main(tmp_path)  # SFT -> RM -> PPO
    capsys.readouterr()
    status, fake = run_main(tmp_path, "--algo", "dpo")
    assert status == 0 and [command[2] for _, command, _ in fake.calls] == ["dpo"]
    assert fake.calls[0][1][:5] == ["bash", str(TINY_SCRIPT), "dpo", str(tmp_path), ""]
    out = capsys.readouterr().out
    assert f"step 1: supervised fine-tuning: skipped, finished: {STAGES[1].metrics_path(tmp_path)}" in out
    assert "== step 2: DPO (" in out
    rows = dict(pipeline_report.summary_rows(tmp_path))
    assert (
        rows["DPO: held-out gold score before -> after"]
        == "+0.500 -> +0.625 (common.evaluation.gold:synthetic_gold)"
    )
    assert rows["DPO: held-out best share"] == "0.25 -> 0.50"
    assert rows["DPO: final KL to the stage-1 policy (per sequence)"] == "3.250"
    assert rows["DPO: held-out pair accuracy before -> after"] == "0.000 -> 0.750"
    assert "stage 3: held-out gold score before -> after" in rows  # both pipelines in one table
    assert rows["wall time: DPO"].endswith("s (0:00)")

    # a rerun stage 1 makes every later output stale, the other pipeline's included
    status, fake = run_main(tmp_path, "--algo", "dpo", "--force", "--step", "1")
    out = capsys.readouterr().out
    assert status == 0 and fake.steps == [1]
    assert stale_note(tmp_path / "dpo", "--algo dpo --step 2 --force") in out
    assert f"note: {tmp_path / 'ppo'} was made from the previous outputs" in out


def test_dpo_pipeline_has_steps_1_and_2_only(tmp_path):
    with pytest.raises(SystemExit, match=r"this pipeline has steps \[1, 2\], not \[3\]"):
        run_main(tmp_path, "--algo", "dpo", "--step", "3")
    status, fake = run_main(tmp_path, "--algo", "dpo", "--dry-run")
    assert status == 0 and [command[2] for _, command, _ in fake.calls] == ["1", "dpo"]


def test_each_preference_loss_is_its_own_pipeline_in_its_own_directory(tmp_path, capsys):
    """--algo kto,orpo,simpo: one stage 1, then DPO's stage with each loss into kto/, orpo/, simpo/, each reported
    under its own title; ORPO and SimPO measure no KL (no reference), so they have no KL row."""
    metrics = json.loads(json.dumps(FAKE_METRICS["dpo"]))
    for evaluation in (metrics["before"], metrics["after"]):
        del evaluation["kl"]
    metrics["final_kl"] = None
    status, fake = run_main(tmp_path, "--algo", "kto,orpo,simpo")
    assert status == 0 and [command[2] for _, command, _ in fake.calls] == ["1", "kto", "orpo", "simpo"]
    out = capsys.readouterr().out
    assert "reward model" not in out.splitlines()[0] and "KTO, ORPO, SimPO" in out.splitlines()[0]
    for name in ("orpo", "simpo"):
        (tmp_path / name / "dpo_metrics.json").write_text(json.dumps(metrics))
    rows = dict(pipeline_report.summary_rows(tmp_path))
    for title in ("KTO", "ORPO", "SimPO"):
        assert rows[f"{title}: held-out gold score before -> after"].startswith("+0.500 -> +0.625")
    assert rows["KTO: final KL to the stage-1 policy (per sequence)"] == "3.250"
    assert "ORPO: final KL to the stage-1 policy (per sequence)" not in rows
    assert "SimPO: final KL to the stage-1 policy (per sequence)" not in rows


@pytest.mark.slow
def test_critic_free_pipeline_reuses_stages_1_and_2_and_reports_beside_ppo(tmp_path, capsys):
    run_main(tmp_path)  # SFT -> RM -> PPO
    capsys.readouterr()
    status, fake = run_main(tmp_path, "--algo", "grpo", "--step3-args=--print_answers")
    assert status == 0 and [command[2] for _, command, _ in fake.calls] == ["grpo"]
    assert fake.calls[0][1] == ["bash", str(TINY_SCRIPT), "grpo", str(tmp_path), "", "--", "--print_answers"]
    out = capsys.readouterr().out
    assert f"step 2: reward model: skipped, finished: {STAGES[2].metrics_path(tmp_path)}" in out
    assert "== step 3: GRPO (" in out
    rows = dict(pipeline_report.summary_rows(tmp_path))
    gold = rows["stage 3: held-out gold score before -> after"]
    assert rows["GRPO: held-out gold score before -> after"] == gold  # both pipelines in one table
    assert rows["GRPO: proxy vs gold"].startswith("REWARD HACKING")
    assert "wall time: step 3 (GRPO)" in rows and "wall time: step 3 (PPO)" in rows

    # a rerun stage 2 makes both stage-3 outputs stale, and not DPO's (made from stage 1 only)
    run_main(tmp_path, "--algo", "dpo")
    capsys.readouterr()
    status, fake = run_main(tmp_path, "--algo", "grpo", "--force", "--step", "2")
    out = capsys.readouterr().out
    assert status == 0 and fake.steps == [2]
    assert stale_note(tmp_path / "ppo", "--step 3 --force") in out
    assert stale_note(tmp_path / "grpo", "--algo grpo --step 3 --force") in out
    assert f"{tmp_path / 'dpo'} was made" not in out
