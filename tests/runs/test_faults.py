"""Nothing a user made is lost, and every fault ends in a sentence (docs/operations.md, "Bad input and faults").

The classes: overwriting (a file we did not write is never replaced; a finished stage is replaced only with
--overwrite_output_dir, and the earlier model stays until the new one is complete), damaged files (truncated
weights, value heads, checkpoints: named, and --resume falls back to the newest whole checkpoint), a save that
cannot be written (disk full: `ulimit -f`), a short last batch of prompts in stage 3, a resume under other
batch settings, typed special-token strings in chat, user errors without a traceback, --reward_fn imports and
a scorer given columns it does not take. Stage runs are one plain process on the tiny model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from common.files import (
    KILL_BEFORE_PUBLISH_ENV,
    STAGING,
    DamagedFileError,
    WriteFailedError,
    check_safetensors,
    final_outputs,
    publish_staged,
    write_text_atomic,
)
from common.training import checkpoint as ckpt
from common.training import output_dir as guard
from tests.launch import REPO, process_threads, run_failing_stage, run_stage
from tests.unit.common.training.test_checkpoint import FakeEngine, parse

pytestmark = pytest.mark.slow  # stages run as processes and killed

SFT = "step1_sft/main.py"
SFT_ARGS = [
    *("--data_split", "1,1,98", "--max_seq_len", "96", "--per_device_train_batch_size", "4"),
    *("--per_device_eval_batch_size", "32", "--seed", "7", "--save_interval", "4"),
]


def hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (relative path -> hex)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def sft_run(tiny_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """One finished stage-1 run (8 steps) with checkpoints step_4 and step_8, and its flags but the output."""
    root = tmp_path_factory.mktemp("faults")
    args = ["--model_name_or_path", str(tiny_dir), "--data_output_path", str(root / "cache"), *SFT_ARGS]
    run_stage(SFT, [*args, "--output_dir", str(root / "sft")], num_procs=1)
    return root / "sft", args


def copy_run(sft_run, tmp_path: Path) -> tuple[Path, list[str]]:
    src, args = sft_run
    out = tmp_path / "sft"
    shutil.copytree(src, out)
    return out, args


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")
    }
    return {
        **env,
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(process_threads()),
        **extra,
    }


# ------------------------------------------------------------------------------------------ overwriting


def test_overwrite_never_replaces_a_model_we_did_not_write(sft_run, tmp_path):
    """--overwrite_output_dir on a directory holding another model: refused before any compute, every
    file's hash unchanged; a directory with unrelated files of someone else gets ours beside them."""
    theirs = tmp_path / "their_model"
    shutil.copytree(
        sft_run[0], theirs, ignore=shutil.ignore_patterns(".rlhf_run.json", "checkpoints", "*.jsonl")
    )
    (theirs / "notes.txt").write_text("mine")
    before = hashes(theirs)
    proc = run_failing_stage(SFT, [*sft_run[1], "--output_dir", str(theirs), "--overwrite_output_dir"])
    err = proc.stderr
    assert "holds files this project did not write, and this stage would replace some of them" in err
    assert "config.json" in err and "model.safetensors" in err
    assert "Traceback" not in proc.stdout + err
    assert hashes(theirs) == before

    notes = tmp_path / "notes_only"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    args = parse(["--output_dir", str(notes)])
    with pytest.raises(
        SystemExit, match="pass --overwrite_output_dir to write this stage's files beside them"
    ):
        guard.check_output_dir(notes, "sft", args)
    args = parse(["--output_dir", str(notes), "--overwrite_output_dir"])
    guard.check_output_dir(notes, "sft", args)
    guard.claim_output_dir(notes, "sft", args)
    assert (notes / "notes.txt").read_text() == "mine"


def test_a_finished_stage_is_replaced_only_with_overwrite(sft_run, tmp_path):
    out, args = copy_run(sft_run, tmp_path)
    shutil.rmtree(out / "checkpoints")  # no checkpoints: before, a plain rerun replaced the model silently
    before = hashes(out)
    proc = run_failing_stage(SFT, [*args, "--output_dir", str(out)])
    assert "holds the model of an earlier sft run: pass --overwrite_output_dir to replace it" in proc.stderr
    assert hashes(out) == before


def test_a_kill_during_the_final_save_keeps_the_earlier_model(sft_run, tmp_path):
    """Rerun in place with --overwrite_output_dir, killed once the new model is staged: the earlier model,
    tokenizer and metrics are untouched (the directory still reads as finished, truthfully); the next
    rerun completes, removes the leftover and writes the metrics last."""
    out, args = copy_run(sft_run, tmp_path)
    model_files = ("model.safetensors", "config.json", "tokenizer.json", "sft_metrics.json")
    before = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in model_files}
    cmd = [sys.executable, SFT, *args, "--output_dir", str(out), "--overwrite_output_dir", "--seed", "8"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(**{KILL_BEFORE_PUBLISH_ENV: "1"}), capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / STAGING / "model.safetensors").is_file()  # the new model was complete, not yet moved
    assert {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in model_files} == before

    run_stage(SFT, [*args, "--output_dir", str(out), "--overwrite_output_dir", "--seed", "8"], num_procs=1)
    assert not (out / STAGING).exists()
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() != before["model.safetensors"]
    assert (out / "sft_metrics.json").stat().st_mtime >= (out / "model.safetensors").stat().st_mtime


def test_publish_replaces_files_and_directories_and_drops_stale_shards(tmp_path):
    out = tmp_path / "out"
    (out / "actor").mkdir(parents=True)
    (out / "actor" / "old.bin").write_text("old")
    for name, text in [
        ("model-00001-of-00002.safetensors", "a"),
        ("config.json", "{}"),
        ("ppo_metrics.json", "{}"),
    ]:
        (out / name).write_text(text)
    (out / "notes.txt").write_text("user's")
    staged = out / STAGING
    (staged / "actor").mkdir(parents=True)
    (staged / "actor" / "model.safetensors").write_text("new")
    (staged / "config.json").write_text('{"new": 1}')
    publish_staged(out, "ppo_metrics.json")
    assert sorted(p.name for p in out.iterdir()) == ["actor", "config.json", "notes.txt"]
    assert [p.name for p in (out / "actor").iterdir()] == ["model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == {"new": 1}


def test_e2e_reruns_a_stage_with_overwrite():
    from pipeline import stages as pipeline_stages

    # how e2e knows a stage directory holds a run of ours
    assert pipeline_stages.RUN_MARKER == guard.RUN_MARKER


# ------------------------------------------------------------------------------------------ damaged files


def test_check_safetensors_names_truncated_and_corrupt_files(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(100), "b": torch.zeros(3, 4)}, str(path))
    check_safetensors(path)  # whole
    data = path.read_bytes()
    for cut, why in [
        (len(data) - 7, "truncated"),
        (5, "not even a safetensors header"),
        (20, "header alone"),
    ]:
        path.write_bytes(data[:cut])
        with pytest.raises(DamagedFileError, match=rf"^{path}: .*{why}"):
            check_safetensors(path)
    path.write_bytes(data + b"xx")
    with pytest.raises(DamagedFileError, match="longer than its header describes"):
        check_safetensors(path)
    path.write_bytes(data[:8] + b"\xff" * (len(data) - 8))
    with pytest.raises(DamagedFileError, match="corrupt safetensors header"):
        check_safetensors(path)


def test_a_stage_refuses_damaged_weights_before_it_starts(sft_run, tmp_path):
    """A truncated model.safetensors handed to the next stage, and a reward model without its value head:
    named, with what to do, before anything is built."""
    from common.validate import check_model_path

    model, _ = copy_run(sft_run, tmp_path)
    truncate(model / "model.safetensors")
    with pytest.raises(
        SystemExit, match=rf"--model_name_or_path {model}/model.safetensors: truncated .*rerun"
    ):
        check_model_path("--model_name_or_path", str(model))
    proc = run_failing_stage(
        "step2_reward/main.py",
        ["--model_name_or_path", str(model), "--output_dir", str(tmp_path / "rm"), "--data_split", "1,1,98"],
    )
    assert f"{model}/model.safetensors: truncated" in proc.stderr and "Traceback" not in proc.stderr

    tokenizer = model / "tokenizer.json"
    truncate(tokenizer)
    (model / "model.safetensors").unlink()
    shutil.copy(sft_run[0] / "model.safetensors", model / "model.safetensors")
    with pytest.raises(
        SystemExit, match=rf"--model_name_or_path {tokenizer}: not valid JSON, truncated or corrupt"
    ):
        check_model_path("--model_name_or_path", str(model))

    rm = tmp_path / "rm_dir"
    rm.mkdir()
    config = {"model_type": "gpt2", "reward_model": {"value_head": "value_head.safetensors"}}
    (rm / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.ones(2)}, str(rm / "model.safetensors"))
    with pytest.raises(
        SystemExit, match=r"--critic_model_name_or_path .*value head \(value_head.safetensors\) is missing"
    ):
        check_model_path("--critic_model_name_or_path", str(rm))


def test_resume_falls_back_from_a_damaged_checkpoint(sft_run, tmp_path, capsys):
    """A truncated optimizer file or trainer state in the newest checkpoint: --resume latest says so and takes
    the one before; --resume naming it says what is damaged and which checkpoints are whole."""
    out, _ = copy_run(sft_run, tmp_path)
    earlier, newest = ckpt.complete_checkpoints(out)
    assert ckpt.checkpoint_damage(newest) is None
    shard = newest / "model" / "mp_rank_00_model_states.pt"  # weights and optimizer state (ZeRO-0)
    truncate(shard)
    assert ckpt.resolve_checkpoint(out, "latest") == earlier
    printed = capsys.readouterr().out
    assert f"skipped the damaged checkpoint {newest.name}: {shard} has" in printed
    assert f"falling back to {earlier}, the newest whole checkpoint" in printed
    with pytest.raises(
        SystemExit, match=rf"--resume {newest}: damaged checkpoint: .*pick another .*'{earlier.name}'"
    ):
        ckpt.resolve_checkpoint(out, str(newest))

    (earlier / ckpt.STATE_FILE).write_text('{"step": 4, "epo')
    with pytest.raises(
        SystemExit, match=r"every checkpoint .* is damaged: step_8: .* step_4: .*trainer_state.json has 16"
    ):
        ckpt.resolve_checkpoint(out, "latest")
    (earlier / ckpt.COMPLETE).write_text("ok\n")  # written before checkpoints recorded their files' sizes
    assert "trainer_state.json: not valid JSON" in ckpt.checkpoint_damage(earlier)


def test_an_unreadable_engine_file_names_the_checkpoint(tmp_path):
    class Unreadable(FakeEngine):
        def load_checkpoint(self, load_dir: str, tag: str):
            raise RuntimeError("PytorchStreamReader failed reading zip archive")

    path = ckpt.save_checkpoint(tmp_path, {"m": FakeEngine()}, ckpt.TrainerState(step=2))
    with pytest.raises(SystemExit, match=rf"--resume {path}: cannot read engine 'm' \(RuntimeError: Pytorch"):
        ckpt.load_checkpoint(path, {"m": Unreadable()})


# ------------------------------------------------------------------------------------------ failed writes


def test_a_failed_final_save_leaves_the_earlier_outputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("earlier")
    (out / "sft_metrics.json").write_text("{}")
    before = hashes(out)
    with pytest.raises(WriteFailedError, match=r"saving the final outputs .* No space left .* is intact"):
        with final_outputs(out, "sft_metrics.json") as staged:
            (staged / "model.safetensors").write_text("half")
            raise OSError(28, "No space left on device")
    assert hashes(out) == before and not (out / STAGING).exists()
    with pytest.raises(ValueError, match="a bug"):  # not a write failure: propagates as it is
        with final_outputs(out, "sft_metrics.json"):
            raise ValueError("a bug")
    write_text_atomic(out / "sft_metrics.json", '{"new": 1}')
    assert json.loads((out / "sft_metrics.json").read_text()) == {"new": 1}


def test_a_full_disk_during_a_checkpoint_stops_with_the_previous_one_intact(sft_run, tmp_path):
    """`ulimit -f` below the checkpoint's largest file: resumed from step_4, the save of step_8 fails; the run
    stops saying so (no traceback), step_4 is intact and whole, nothing of step_8 is left."""
    out, args = copy_run(sft_run, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step_8")
    step4 = out / "checkpoints" / "step_4"
    before = hashes(step4)
    largest = max(p.stat().st_size for p in step4.rglob("*") if p.is_file())
    command = [sys.executable, SFT, *args, "--output_dir", str(out), "--resume"]
    limit = (largest // 1024) - 1  # in 1024-byte blocks: the largest file cannot be written again
    proc = subprocess.run(
        ["bash", "-c", f'ulimit -f {limit}; exec "$@"', "bash", *command],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"error: writing checkpoint {out}/checkpoints/step_8.tmp failed:" in proc.stderr
    assert f"the previous checkpoint ({step4}) is intact" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert hashes(step4) == before and ckpt.checkpoint_damage(step4) is None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4"]


# ------------------------------------------------------------------------------------ silent before


def test_resume_with_another_batch_size_is_refused(sft_run, tmp_path):
    out, args = copy_run(sft_run, tmp_path)
    proc = run_failing_stage(
        SFT, [*args, "--output_dir", str(out), "--resume", "--per_device_train_batch_size", "8"]
    )
    assert (
        "its data position was saved under other settings: --per_device_train_batch_size was 4, is 8"
        in proc.stderr
    )
    saved = {"seed": 7, "train_rows": 30, "train_sha256": "a" * 64, "world_size": 1}
    now = {**saved, "train_rows": 31, "train_sha256": "b" * 64}
    assert ckpt._position_changes(saved, now) == [
        "the train data changed (30 rows, sha256 aaaaaaaaaaaa then; 31 rows, sha256 bbbbbbbbbbbb now)"
    ]


def test_stage3_drops_a_short_last_prompt_batch_and_the_gold_takes_extra_columns(tiny_dir, tmp_path):
    """18 training prompts in batches of 4 (before: a crash at the fifth iteration, after a whole epoch), with
    an extra column in the data that the bundled gold, used as --reward_fn, does not take."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(line) for line in (REPO / "data/synthetic/train.jsonl").read_text().splitlines()[:22]]
    (data / "train.jsonl").write_text("".join(json.dumps({**r, "source": "mine"}) + "\n" for r in rows[:18]))
    (data / "test.jsonl").write_text("".join(json.dumps({**r, "source": "mine"}) + "\n" for r in rows[18:]))
    out = tmp_path / "ppo"
    args = [
        *("--actor_model_name_or_path", str(tiny_dir), "--data_path", str(data), "--data_split", "0,0,1"),
        *("--output_dir", str(out), "--data_output_path", str(tmp_path / "cache")),
        *("--advantage_estimator", "reinforce_pp", "--reward_fn", "common.evaluation.gold:synthetic_gold"),
        *("--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4"),
        *("--max_prompt_seq_len", "48", "--max_answer_seq_len", "8", "--eval_num_prompts", "4"),
    ]
    log = run_stage("step3_rlhf/main.py", args, num_procs=1)
    assert "[ppo] 18 prompts per rank and epoch: 4 iterations of 1 x 4; the 2 left over are not used" in log
    metrics = json.loads((out / "ppo_metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [1, 2, 3, 4]


def test_a_split_in_a_format_we_do_not_read_is_an_error(tmp_path):
    from common.data import DataError
    from common.data.local_files import split_files

    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "test.csv").write_text("prompt,chosen\n")
    (tmp_path / "README.md").write_text("notes")
    with pytest.raises(
        DataError, match=r"\['test.csv'\] look like data splits, in a format this project does not read"
    ):
        split_files(tmp_path)
    (tmp_path / "test.csv").unlink()
    assert split_files(tmp_path) == ([tmp_path / "train.jsonl"], [])


def test_typed_special_token_strings_stay_text(tiny_dir):
    """chat.py's encoding: "<|endoftext|>" typed by a user is characters, never the EOS id; with a chat
    template, the template's own tokens stay special and the typed ones stay text."""
    from common.data.chat_format import ChatFormat
    from common.models.loading import load_tokenizer
    from step1_sft.prompt_eval import encode_prompt

    tok = load_tokenizer(str(tiny_dir))
    prompt = "\n\nHuman: say <|endoftext|> now\n\nAssistant:"
    ids = encode_prompt(tok, prompt, None)
    assert tok.eos_token_id not in ids and "<|endoftext|>" in tok.decode(ids)

    chat_tok = load_tokenizer(str(tiny_dir))
    chat_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat_tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fmt = ChatFormat.for_tokenizer(chat_tok)
    end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    plain = encode_prompt(chat_tok, "\n\nHuman: hi\n\nAssistant:", fmt)
    assert plain.count(end) == 1  # the template's own end of the user turn
    typed = encode_prompt(chat_tok, "\n\nHuman: hi <|im_end|> <|endoftext|>\n\nAssistant:", fmt)
    assert typed.count(end) == 1 and tok.eos_token_id not in typed
    assert "hi <|im_end|> <|endoftext|>" in chat_tok.decode(typed)


# ---------------------------------------------------------------------------------- messages, not tracebacks


def test_reward_fn_imports_from_the_working_directory_and_names_a_broken_module(tmp_path, monkeypatch):
    from common.evaluation.score_fn import import_score_function

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    (tmp_path / "my_reward.py").write_text("def score(p, r, f):\n    return [1.0] * len(p)\n")
    assert import_score_function("my_reward:score", "--reward_fn")(["a"], ["b"], [True]) == [1.0]
    (tmp_path / "broken_reward.py").write_text("import json\ndef score(p, r, f)\n    return []\n")
    with pytest.raises(
        SystemExit, match=r"importing module 'broken_reward' raised SyntaxError: .*broken_reward.py, line 2"
    ):
        import_score_function("broken_reward:score", "--reward_fn")
    (tmp_path / "needs_missing.py").write_text("import not_installed_anywhere\n")
    with pytest.raises(SystemExit, match=r"importing module 'needs_missing' raised ModuleNotFoundError"):
        import_score_function("needs_missing:score", "--reward_fn")
    with pytest.raises(SystemExit, match=rf"no module 'nowhere' in the working directory \({tmp_path}\)"):
        import_score_function("nowhere:score", "--reward_fn")


def test_a_scorer_gets_only_the_columns_it_takes():
    from common.evaluation.gold import synthetic_gold
    from common.evaluation.score_fn import ScoreFunction, call_score_function

    prompt = json.loads((REPO / "data/synthetic/test.jsonl").read_text().splitlines()[0])["prompt"]
    gold = ScoreFunction("common.evaluation.gold:synthetic_gold", synthetic_gold)
    scores, _ = call_score_function(gold, [prompt], [" Fine."], [True], {"source": ["mine"]})
    assert len(scores) == 1
    seen = {}

    def takes_all(prompts, responses, finished, **columns):
        seen.update(columns)
        return [0.0] * len(prompts)

    call_score_function(ScoreFunction("t:all", takes_all), [prompt], ["x"], [True], {"source": ["mine"]})
    assert seen == {"source": ["mine"]}


def test_a_weights_mismatch_ends_in_its_message_without_a_traceback(tiny_dir, tmp_path):
    """A user error raised after validation (here weights that do not fit the config) prints its message."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    save_file({"unexpected.weight": torch.ones(2)}, str(bad / "model.safetensors"))
    (bad / "config.json").write_text(json.dumps(config))
    proc = run_failing_stage(SFT, ["--model_name_or_path", str(bad), "--output_dir", str(tmp_path / "o")])
    assert proc.returncode == 1
    assert f"error: {bad}: its weights do not fit" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_a_damaged_data_cache_is_rebuilt(tmp_path, capsys):
    from common.data.cache import build_once_per_node

    calls = []

    def build() -> dict:
        calls.append(1)
        return {"rows": torch.arange(1000)}

    blob, built = build_once_per_node(tmp_path, "stage1_sft", lambda: "k", build)
    assert built and len(calls) == 1
    truncate(tmp_path / "stage1_sft_k.pt")
    blob, built = build_once_per_node(tmp_path, "stage1_sft", lambda: "k", build)
    assert built and len(calls) == 2 and torch.equal(blob["rows"], torch.arange(1000))
    assert f"[data] {tmp_path / 'stage1_sft_k.pt'} is damaged (" in capsys.readouterr().out


def test_a_train_log_line_cut_short_by_a_kill_is_left_out(tmp_path):
    (tmp_path / ckpt.TRAIN_LOG).write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo'
    )
    assert ckpt.read_train_log(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    ckpt.truncate_train_log(tmp_path, 1)
    assert ckpt.read_train_log(tmp_path) == [{"step": 1, "loss": 2.0}]
    (tmp_path / ckpt.TRAIN_LOG).write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.5}\n')
    with pytest.raises(DamagedFileError, match=r"train_log.jsonl line 1: not valid JSON"):
        ckpt.read_train_log(tmp_path)


def test_chat_and_eval_name_a_truncated_model(sft_run, tmp_path):
    from step1_sft.prompt_eval import load_for_generation

    model, _ = copy_run(sft_run, tmp_path)
    truncate(model / "model.safetensors")
    with pytest.raises(SystemExit, match=rf"--path {model}/model.safetensors: truncated"):
        load_for_generation(str(model))
