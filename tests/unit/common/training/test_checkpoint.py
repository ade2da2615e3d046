"""common.training.checkpoint in one process: atomic saves (a save killed halfway is never resumed from), pruning,
RNG round trip, the non-finite stop and the output-directory guard. The multi-rank SIGKILL/resume runs of
the stages are in tests/runs/test_resume_runs.py."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from common.args import add_checkpoint_args
from common.training import checkpoint as ckpt
from common.training import output_dir as guard


class FakeEngine:
    """Stands in for a DeepSpeed engine: saves/loads one tensor; `fail` makes save die halfway."""

    def __init__(self, value: float = 0.0, fail: bool = False):
        self.value, self.fail = value, fail

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = True) -> None:
        d = Path(save_dir) / tag
        d.mkdir(parents=True)
        (d / "part1").write_text(str(self.value))
        if self.fail:
            raise KeyboardInterrupt("killed halfway through the save")
        (d / "part2").write_text("done")

    def load_checkpoint(self, load_dir: str, tag: str):
        d = Path(load_dir) / tag
        if not (d / "part2").is_file():
            return None, None
        self.value = float((d / "part1").read_text())
        return str(d), {}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir")
    add_checkpoint_args(parser)
    return parser.parse_args(argv)


def prepare(out: Path, stage: str, args: argparse.Namespace) -> None:
    """What a stage does: check before any compute, claim (marker, fresh start) once the model is built."""
    guard.check_output_dir(out, stage, args)
    guard.claim_output_dir(out, stage, args)


def test_save_is_atomic_and_latest_skips_incomplete(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"model": FakeEngine(1.0)}, ckpt.TrainerState(step=2, epoch=0))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, {"model": FakeEngine(2.0, fail=True)}, ckpt.TrainerState(step=4))
    # A renamed directory whose COMPLETE marker was never written (killed between rename and marker).
    (tmp_path / "checkpoints" / "step_6").mkdir()
    (tmp_path / "checkpoints" / "step_6" / ckpt.STATE_FILE).write_text("{}")

    assert (tmp_path / "checkpoints" / "step_4.tmp").is_dir()
    assert ckpt.complete_checkpoints(tmp_path) == [tmp_path / "checkpoints" / "step_2"]
    latest = ckpt.resolve_checkpoint(tmp_path, "latest")
    assert latest.name == "step_2"
    engine = FakeEngine()
    state = ckpt.load_checkpoint(latest, {"model": engine})
    assert engine.value == 1.0 and state.step == 2
    with pytest.raises(SystemExit, match="not a complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step_6"))

    # Saving step 4 again replaces the half-written attempt.
    ckpt.save_checkpoint(tmp_path, {"model": FakeEngine(3.0)}, ckpt.TrainerState(step=4))
    assert not (tmp_path / "checkpoints" / "step_4.tmp").exists()
    assert ckpt.resolve_checkpoint(tmp_path, "latest").name == "step_4"


def test_trainer_state_round_trip_and_world_size_check(tmp_path):
    state = ckpt.TrainerState(step=6, epoch=1, batches_in_epoch=3, skipped_steps=1, extra={"curve": [2.5]})
    path = ckpt.save_checkpoint(tmp_path, {"model": FakeEngine(5.0)}, state)
    loaded = ckpt.load_checkpoint(path, {"model": FakeEngine()})
    assert (loaded.step, loaded.epoch, loaded.batches_in_epoch, loaded.skipped_steps) == (6, 1, 3, 1)
    assert loaded.extra == {"curve": [2.5]} and loaded.world_size == 1
    data = json.loads((path / ckpt.STATE_FILE).read_text())
    (path / ckpt.STATE_FILE).write_text(json.dumps({**data, "world_size": 4}))
    with pytest.raises(SystemExit, match="saved by 4 ranks, this run has 1"):
        ckpt.load_checkpoint(path, {"model": FakeEngine()})


def test_save_total_limit_prunes_only_our_old_checkpoints(tmp_path):
    foreign = tmp_path / "checkpoints" / "notes"
    foreign.mkdir(parents=True)
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(
            tmp_path, {"m": FakeEngine(step)}, ckpt.TrainerState(step=step), save_total_limit=2
        )
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_6", "step_8"]
    assert foreign.is_dir()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["notes", "step_6", "step_8"]


def test_rng_restored_exactly(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    path = ckpt.save_checkpoint(tmp_path, {}, ckpt.TrainerState(step=1))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ckpt.restore_rng(path)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_train_log_truncated_to_checkpoint_step(tmp_path):
    for step in range(1, 6):
        ckpt.append_train_log(tmp_path, {"step": step, "loss": float(step)})
    ckpt.truncate_train_log(tmp_path, 3)
    assert [r["step"] for r in ckpt.read_train_log(tmp_path)] == [1, 2, 3]


def test_nonfinite_loss_stops_or_skips(monkeypatch):
    assert ckpt.check_finite_loss(torch.tensor(1.5), stage="sft", step=1)
    with pytest.raises(ckpt.NonFiniteError, match=r"\[sft\] step 7: non-finite loss"):
        ckpt.check_finite_loss(torch.tensor(float("inf")), stage="sft", step=7)
    assert not ckpt.check_finite_loss(torch.tensor(float("nan")), stage="reward", step=2, skip=True)
    # The test hook poisons exactly the named step.
    monkeypatch.setenv(ckpt.INJECT_NAN_ENV, "3")
    monkeypatch.setattr(ckpt, "_injected", set())
    assert ckpt.check_finite_loss(torch.tensor(1.0), stage="sft", step=2)
    with pytest.raises(ckpt.NonFiniteError, match="step 3"):
        ckpt.check_finite_loss(torch.tensor(1.0), stage="sft", step=3)
    assert ckpt.check_finite_loss(torch.tensor(1.0), stage="sft", step=3)  # injected once only


def test_nonfinite_grad_norm_stops():
    class Engine:
        def __init__(self, norm):
            self.norm = norm

        def get_global_grad_norm(self):
            return self.norm

    ckpt.check_finite_grad_norm(Engine(None), stage="reward", step=1)
    ckpt.check_finite_grad_norm(Engine(2.0), stage="reward", step=1)
    with pytest.raises(ckpt.NonFiniteError, match=r"\[reward\] step 4: non-finite gradient norm"):
        ckpt.check_finite_grad_norm(Engine(float("nan")), stage="reward", step=4)


def test_output_dir_guard(tmp_path):
    out = tmp_path / "run"
    guard.check_output_dir(out, "sft", parse([]))
    assert not out.exists(), "the check alone writes nothing (bad input must leave no directory behind)"
    # Missing, or only what a launch script writes before the stage starts: fine, and marked as ours.
    out.mkdir()
    (out / "training.log").write_text("log")
    prepare(out, "sft", parse(["--output_dir", str(out)]))
    assert json.loads((out / guard.RUN_MARKER).read_text())["stage"] == "sft"
    # A rerun of the same stage without checkpoints replaces its own files.
    (out / "model.safetensors").write_text("weights")
    prepare(out, "sft", parse([]))
    # Another stage's directory, or someone else's files: refused unless --overwrite_output_dir.
    with pytest.raises(SystemExit, match="stage 'sft'"):
        prepare(out, "reward", parse([]))
    other = tmp_path / "theirs"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(SystemExit, match="thesis.tex.*did not write"):
        prepare(other, "sft", parse([]))
    with pytest.raises(SystemExit, match="holds no earlier run"):
        prepare(other, "sft", parse(["--resume"]))
    prepare(other, "sft", parse(["--overwrite_output_dir"]))
    assert (other / "thesis.tex").read_text() == "precious"


def test_output_dir_guard_with_checkpoints(tmp_path):
    out = tmp_path / "run"
    prepare(out, "reward", parse([]))
    ckpt.save_checkpoint(out, {"m": FakeEngine()}, ckpt.TrainerState(step=2))
    (out / "checkpoints" / "mine.txt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="--resume to continue it or --overwrite_output_dir"):
        prepare(out, "reward", parse([]))
    prepare(out, "reward", parse(["--resume"]))
    assert parse(["--resume"]).resume == "latest"
    ckpt.append_train_log(out, {"step": 1, "loss": 1.0})
    prepare(out, "reward", parse(["--overwrite_output_dir"]))
    assert ckpt.complete_checkpoints(out) == []
    assert (out / "checkpoints" / "mine.txt").is_file()
    assert not (out / ckpt.TRAIN_LOG).exists(), "a fresh run must not append to the old run's log"
    # Without complete checkpoints, a rerun needs no flag and clears a save killed halfway.
    (out / "checkpoints" / "step_9.tmp").mkdir()
    prepare(out, "reward", parse([]))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["mine.txt"]
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(out, "latest")


def test_resume_auto_resumes_when_it_can_and_starts_fresh_otherwise(tmp_path):
    out = tmp_path / "run"
    args = parse(["--resume", "auto"])
    prepare(out, "reward", args)  # nothing there: a fresh start
    assert args.resume is None
    ckpt.save_checkpoint(out, {"m": FakeEngine()}, ckpt.TrainerState(step=2))
    args = parse(["--resume", "auto"])
    prepare(out, "reward", args)
    assert args.resume == "latest"
    args = parse(["--resume", "auto"])  # another stage's checkpoints are never resumed, nor overwritten
    with pytest.raises(SystemExit, match="holds a run of stage 'reward'"):
        prepare(out, "sft", args)


def _loader(n: int, batch: int) -> torch.utils.data.DataLoader:
    from common.training.engines import train_loader

    return train_loader(list(range(n)), torch.tensor, batch, seed=3)


@pytest.mark.parametrize("consumed", [0, 2, 3, 4, 7])  # 3 batches per epoch: 3 is an epoch's end
def test_batch_stream_positioned_continues_like_the_original(consumed):
    """A stream rebuilt at position n, with the RNG restored after positioning (as resume does), yields
    the batches and leaves the torch RNG exactly as the stream that ran through n batches."""
    torch.manual_seed(0)
    original = ckpt.BatchStream(_loader(6, 2), epochs=3)
    head = [next(original).tolist() for _ in range(consumed)]
    rng_at_checkpoint = torch.get_rng_state()
    tail = [next(original).tolist() for _ in range(9 - consumed)]
    after = torch.rand(3)
    with pytest.raises(StopIteration):
        next(original)

    torch.manual_seed(123)  # a new process: some other RNG state
    resumed = ckpt.BatchStream(_loader(6, 2), consumed=consumed, epochs=3)
    torch.set_rng_state(rng_at_checkpoint)
    assert resumed.consumed == consumed
    assert [next(resumed).tolist() for _ in range(9 - consumed)] == tail
    assert torch.equal(torch.rand(3), after)
    epochs = [sorted(sum(head + tail, [])[i : i + 6]) for i in (0, 6, 12)]
    assert epochs == [list(range(6))] * 3  # every epoch a permutation of the data...
    assert (head + tail)[:3] != (head + tail)[3:6]  # ...reshuffled per epoch


def test_batch_stream_refuses_empty_loader():
    with pytest.raises(ValueError, match="no batches"):
        ckpt.BatchStream(_loader(0, 2))
