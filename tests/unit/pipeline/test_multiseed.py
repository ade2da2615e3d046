"""Seeds as an axis: the statistics of pipeline/multiseed.py against values worked out by hand, and
`e2e_rlhf.py --seeds` (with an injected runner that plays the stages) running every stage of every seed with
that seed into OUT/seed-N and printing the multi-seed summary."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import e2e_rlhf
from common.evaluation.metrics import PolicyMetrics
from pipeline import run as pipeline_run
from pipeline.multiseed import (
    MEASURES,
    Method,
    bootstrap_interval,
    collect,
    describe,
    format_summary,
    markdown_table,
    seed_result,
    write_summary,
)
from pipeline.stages import PREFERENCE
from tests.wiring.test_e2e import FAKE_METRICS, TINY_SCRIPT, stage_of


def metrics(gold=(0.5, 0.75), best=(0.25, 0.5), malformed=(0.0, 0.0625), distinct=(0.5, 0.25), kl=2.0):
    """A stage-3 metrics file's fields that the multi-seed summary reads, before -> after."""
    side = [
        {"gold_mean": g, "gold_share_best": b, "gold_share_malformed": m, "distinct_2": d, "kl": 0.0}
        for g, b, m, d in zip(gold, best, malformed, distinct, strict=True)
    ]
    return {
        "before": side[0],
        "after": side[1],
        "final_kl": kl,
        "evals": [{"step": 0, "kl": 0.0, "gold_mean": gold[0]}, {"step": 5, "kl": kl, "gold_mean": gold[1]}],
    }


def test_seed_result_reads_the_gold_figures():
    r = seed_result(PolicyMetrics.from_dict(metrics()))
    assert r["gold_gain"] == 0.25 and r["best_gain"] == 0.25
    assert r["malformed_after"] == 0.0625 and r["malformed_change"] == 0.0625
    assert r["final_kl"] == 2.0 and r["distinct_2_ratio"] == 0.5
    no_gold = metrics()
    del no_gold["after"]["gold_mean"]
    assert seed_result(PolicyMetrics.from_dict(no_gold)) is None
    dpo = metrics()
    dpo["final_kl"] = None  # DPO's file may lack it: the after evaluation's KL is used
    dpo["after"]["kl"] = 3.0
    assert seed_result(PolicyMetrics.from_dict(dpo))["final_kl"] == 3.0


def test_describe_by_hand():
    values = [0.1, 0.3, -0.2, 0.4]
    d = describe(values, higher_is_better=True)
    assert d["mean"] == pytest.approx(0.15)
    # sample std: deviations -0.05, 0.15, -0.35, 0.25 -> squares sum 0.21, / 3
    assert d["std"] == pytest.approx((0.21 / 3) ** 0.5)
    assert d["worst"] == -0.2
    assert describe(values, higher_is_better=False)["worst"] == 0.4
    assert d["ci_low"] < d["mean"] < d["ci_high"]
    assert -0.2 <= d["ci_low"] and d["ci_high"] <= 0.4  # a mean of resamples stays within the values


def test_bootstrap_interval():
    assert bootstrap_interval([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
    assert bootstrap_interval([0.5]) == (0.5, 0.5)
    # two values 0 and 1: a resample of 2 has mean 0 (1/4), 0.5 (1/2) or 1 (1/4): the 2.5th and 97.5th
    # percentiles of 10000 such means are 0 and 1
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    wide, narrow = bootstrap_interval([0, 1, 0, 1, 0, 1]), bootstrap_interval([0.4, 0.6] * 3)
    assert wide[1] - wide[0] > narrow[1] - narrow[0]
    assert bootstrap_interval([0.1, 0.2, 0.9]) == bootstrap_interval([0.1, 0.2, 0.9])  # fixed resampling seed


def write_seed(out: Path, seed: int, name: str, m: dict, file: str = "ppo_metrics.json") -> None:
    d = out / f"seed-{seed}" / name
    d.mkdir(parents=True)
    (d / file).write_text(json.dumps(m))


def test_collect_summarises_each_method_over_its_seeds(tmp_path):
    write_seed(tmp_path, 1, "ppo", metrics(gold=(0.5, 0.75), kl=2.0))
    write_seed(tmp_path, 2, "ppo", metrics(gold=(0.5, 0.25), kl=4.0))
    write_seed(tmp_path, 3, "ppo", metrics(gold=(0.25, 0.5), kl=3.0))
    write_seed(tmp_path, 1, "dpo", metrics(gold=(0.5, 0.625)), "dpo_metrics.json")
    write_seed(tmp_path, 7, "ppo", metrics(gold=(0.0, 1.0)))  # a seed not asked for: not counted
    methods = [Method("ppo", "PPO", "ppo_metrics.json"), Method("grpo", "GRPO", "ppo_metrics.json"),
               Method("dpo", "DPO", "dpo_metrics.json")]  # fmt: skip
    summary = collect(tmp_path, [1, 2, 3], methods)
    assert list(summary) == ["PPO", "DPO"]  # GRPO ran on no seed
    ppo = summary["PPO"]
    assert ppo["seeds"] == [1, 2, 3] and ppo["gold_raised"] == 2
    assert ppo["stats"]["gold_gain"]["mean"] == pytest.approx((0.25 - 0.25 + 0.25) / 3)
    assert ppo["stats"]["gold_gain"]["worst"] == -0.25
    assert ppo["stats"]["final_kl"]["worst"] == 4.0 and ppo["stats"]["final_kl"]["mean"] == 3.0
    assert ppo["curves"][2] == ([0.0, 4.0], [0.5, 0.25])
    assert summary["DPO"]["seeds"] == [1]

    text = format_summary(summary)
    assert "== PPO: 3 seeds (1, 2, 3), gold raised on 2 of 3" in text
    assert "gold gain" in text and "+0.25 -0.25 +0.25" in text
    table = markdown_table(summary)
    assert table.splitlines()[2].startswith("| PPO | 3 | +0.083 (-0.250) |")
    assert table.splitlines()[2].endswith("| 2/3 |")
    assert len(table.splitlines()[0].split("|")) == len(MEASURES) + 5

    paths = write_summary(tmp_path, summary)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(paths["json"].read_text())
    assert saved["PPO"]["per_seed"]["2"]["gold_gain"] == -0.25
    assert paths["table"].read_text().strip() == table


def test_a_reference_free_loss_has_no_kl_and_says_so(tmp_path):
    """ORPO and SimPO load no reference, so their files hold no KL: the summary says n/a, not 0."""
    for seed in (1, 2):
        m = metrics(gold=(0.5, 0.5 + seed / 8))
        m["final_kl"] = None
        for evaluation in (m["before"], m["after"], *m["evals"]):
            del evaluation["kl"]
        write_seed(tmp_path, seed, "simpo", m, "dpo_metrics.json")
    summary = collect(tmp_path, [1, 2], [Method("simpo", "SimPO", "dpo_metrics.json")])
    row = markdown_table(summary).splitlines()[2].split(" | ")
    kl_column = 2 + [m.key for m in MEASURES].index("final_kl")
    assert row[kl_column] == "n/a (n/a)" and row[2] == "+0.188 (+0.125)"
    assert summary["SimPO"]["curves"][1] == ([], [])
    assert write_summary(tmp_path, summary)["png"].is_file()


# ---------------------------------------------------------------------------------------------- e2e --seeds


class SeededStages:
    """Plays the launch scripts of several seeds: writes each stage's metrics under the OUTPUT it was given,
    a stage-3 gold gain that depends on the seed, and records (SEED, OMP_NUM_THREADS, OUTPUT, STEP)."""

    def __init__(self):
        self.calls: list[tuple[str, str | None, str, str]] = []

    def __call__(self, run: pipeline_run.StageRun) -> int:
        stage, out = stage_of(run), Path(run.command[3])
        seed = run.env["SEED"]
        self.calls.append((seed, run.env.get("OMP_NUM_THREADS"), str(out), stage.name))
        stage.dir(out).mkdir(parents=True, exist_ok=True)
        m = FAKE_METRICS["dpo" if stage.name in PREFERENCE else run.step]
        if stage.step == 3:
            m = json.loads(json.dumps(m))
            m["after"]["gold_mean"] = m["before"]["gold_mean"] + int(seed) / 10
        stage.metrics_path(out).write_text(json.dumps(m))
        return 0


@pytest.mark.parametrize("jobs", [1, 2])
def test_seeds_run_every_stage_with_the_seed_into_its_own_directory(tmp_path, capsys, monkeypatch, jobs):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(e2e_rlhf.os, "cpu_count", lambda: 4)
    runner = SeededStages()
    argv = [
        "--tiny",
        "--seeds",
        "1,2,3",
        "--algo",
        "ppo,grpo,dpo",
        "--jobs",
        str(jobs),
        "--output-dir",
        str(tmp_path),
    ]
    assert e2e_rlhf.main(argv, runner=runner) == 0
    out = capsys.readouterr().out
    for seed in ("1", "2", "3"):
        mine = [c for c in runner.calls if c[0] == seed]
        # each seed: sft, rm, ppo, then grpo and dpo on the same sft/rm (run once each)
        assert [c[3] for c in mine] == ["sft", "rm", "ppo", "grpo", "dpo"], mine
        assert {c[2] for c in mine} == {str(tmp_path / f"seed-{seed}")}
        assert {c[1] for c in mine} == {None if jobs == 1 else "2"}
    summary = json.loads((tmp_path / "multiseed_summary.json").read_text())
    assert set(summary) == {"PPO", "GRPO", "DPO"}
    assert [summary["PPO"]["per_seed"][s]["gold_gain"] for s in "123"] == pytest.approx([0.1, 0.2, 0.3])
    assert "== PPO: 3 seeds (1, 2, 3), gold raised on 3 of 3" in out
    assert (tmp_path / "multiseed_gold_vs_kl.png").is_file()
    assert "[seed 2] == step 3: PPO" in out


def test_seed_env_sets_the_seed_and_shares_the_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(e2e_rlhf.os, "cpu_count", lambda: 2)
    assert e2e_rlhf.seed_env({"A": "1"}, 5, jobs=1) == {"A": "1", "SEED": "5"}
    assert e2e_rlhf.seed_env({}, 5, jobs=2)["OMP_NUM_THREADS"] == "1"
    assert e2e_rlhf.seed_env({}, 5, jobs=4)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's setting wins
    assert "OMP_NUM_THREADS" not in e2e_rlhf.seed_env({}, 5, jobs=2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "1,x"], "seeds are comma-separated integers"),
        (["--seeds", "1,1"], "distinct seeds"),
        (["--algo", "ppo,nope"], "choose from"),
        (["--jobs", "0"], "--jobs must be >= 1"),
    ],
)
def test_bad_seed_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        e2e_rlhf.parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_tiny_launch_script_takes_the_seed_from_the_environment(tmp_path, monkeypatch):
    """SEED reaches every stage's command (after the script's own --seed, so it wins) and the tiny model's init."""
    env = {**os.environ, "SEED": "7"}
    lines = subprocess.run(
        ["bash", str(TINY_SCRIPT), "1", str(tmp_path), "--dry-run"], env=env, capture_output=True, text=True,
        check=True,
    ).stdout.splitlines()  # fmt: skip
    assert lines[0].endswith("tools.tiny " + str(tmp_path / "tiny") + " --arch opt --seed 7")
    words = lines[1].split()
    seeds = [words[i + 1] for i, w in enumerate(words) if w == "--seed"]
    assert seeds[-1] == "7" and len(seeds) == 2


def test_reward_members_train_before_the_main_reward_model_and_join_stage_3(tmp_path):
    """REWARD_MEMBERS=3: step 2 trains rm-2 and rm-3 (same data slice, their own seeds) before rm/, and steps 3
    and grpo score with the ensemble of the three; DPO takes none of it."""
    env = {**os.environ, "SEED": "4", "REWARD_MEMBERS": "3"}

    def dry(step: str) -> list[list[str]]:
        out = subprocess.run(
            ["bash", str(TINY_SCRIPT), step, str(tmp_path), "--dry-run"], env=env, capture_output=True, text=True,
            check=True,
        ).stdout  # fmt: skip
        return [line.split()[1:] for line in out.splitlines() if line.startswith("+ ")]

    def last(cmd: list[str], flag: str) -> str:
        return [cmd[i + 1] for i, w in enumerate(cmd) if w == flag][-1]

    step2 = dry("2")
    assert [last(c, "--output_dir") for c in step2] == [str(tmp_path / f) for f in ("rm-2", "rm-3", "rm")]
    assert [last(c, "--seed") for c in step2] == ["402", "403", "4"]
    assert [last(c, "--data_split_seed") for c in step2[:2]] == [
        "4",
        "4",
    ] and "--data_split_seed" not in step2[2]
    for step in ("3", "grpo"):
        (cmd,) = dry(step)
        i = cmd.index("--reward_ensemble_models")
        assert cmd[i + 1 : i + 3] == [str(tmp_path / "rm-2"), str(tmp_path / "rm-3")]
    assert "--reward_ensemble_models" not in dry("dpo")[0]


def test_e2e_reward_members_reach_the_launch_scripts(tmp_path, monkeypatch):
    monkeypatch.delenv("REWARD_MEMBERS", raising=False)
    runner = SeededStages()
    seen = []
    argv = ["--tiny", "--seeds", "1", "--reward-members", "3", "--output-dir", str(tmp_path)]
    assert (
        e2e_rlhf.main(argv, runner=lambda run: seen.append(run.env.get("REWARD_MEMBERS")) or runner(run)) == 0
    )
    assert seen == ["3", "3", "3"]
    with pytest.raises(SystemExit):
        e2e_rlhf.parse_args(["--reward-members", "0"])
