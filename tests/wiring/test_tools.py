"""The evaluation and chat tools on the tiny default: chat.py (multi-turn history, streaming, stopping at EOS,
at the token limit or at the model's own "Human:" turn, driven by piped input), step1_sft/prompt_eval.py
(both models' answers side by side) and the PPO-curve plot."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import chat
from common.evaluation import plot
from common.evaluation.metrics import PolicyMetrics
from common.models.loading import load_tokenizer
from step1_sft import prompt_eval
from tools.tiny import write_tiny

REPO = Path(__file__).resolve().parents[2]


def constant_model(tiny_dir: Path, token_id: int):
    """The tiny OPT rigged to predict `token_id` at every position: the final layer norm outputs the constant
    vector 1 and the (tied) output embedding is zero except for that token's row, so its logit is
    hidden_size and every other logit 0."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        norm = model.model.decoder.final_layer_norm
        norm.weight.zero_()
        norm.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id] = 1.0
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(str(tiny_dir))


def word_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    assert len(ids) == 1, f"{word!r} is not one token of the tiny tokenizer: {ids}"
    return ids[0]


# ------------------------------------------------------------------ chat


def test_conversation_format_matches_the_training_data():
    history = [("How do I bake bread?", " Knead the dough."), ("Thanks!", " You are welcome.")]
    assert chat.format_conversation(history, "And cookies?") == (
        "\n\nHuman: How do I bake bread?\n\nAssistant: Knead the dough."
        "\n\nHuman: Thanks!\n\nAssistant: You are welcome."
        "\n\nHuman: And cookies?\n\nAssistant:"
    )
    assert chat.format_conversation([], "Hi") == "\n\nHuman: Hi\n\nAssistant:"


def test_oldest_turns_are_dropped_to_fit_the_context(tokenizer):
    history = [(f"question {i}", f" answer number {i}") for i in range(6)]
    full = len(tokenizer(chat.format_conversation(history, "last"), add_special_tokens=False).input_ids)
    prompt, dropped = chat.fit_conversation(tokenizer, history, "last", full)
    assert dropped == 0 and prompt == chat.format_conversation(history, "last")
    prompt, dropped = chat.fit_conversation(tokenizer, history, "last", full - 1)
    assert dropped == 1 and prompt == chat.format_conversation(history[1:], "last")
    prompt, dropped = chat.fit_conversation(tokenizer, history, "last", 1)
    assert dropped == 6 and prompt == chat.format_conversation([], "last")


def test_streamer_writes_the_answer_and_holds_back_the_next_human_turn(tokenizer):
    out = io.StringIO()
    streamer = chat.AnswerStreamer(tokenizer, out)
    for chunk in [" Sure, here", " you go.\n\nHu"]:
        streamer.on_finalized_text(chunk)
    assert out.getvalue() == " Sure, here you go."  # "\n\nHu" could start the next "Human:": held back
    streamer.on_finalized_text("man: more")
    streamer.on_finalized_text("", stream_end=True)
    assert out.getvalue() == " Sure, here you go.\n"  # nothing more written but the final newline
    assert prompt_eval.cut_answer(" Sure, here you go.\n\nHuman: more") == " Sure, here you go."

    out = io.StringIO()
    streamer = chat.AnswerStreamer(tokenizer, out)
    streamer.on_finalized_text(" Hug the H")
    assert out.getvalue() == " Hug the"
    streamer.on_finalized_text("orse.\n\n")
    assert out.getvalue() == " Hug the Horse."  # a held-back prefix that is not "Human:" comes out
    streamer.on_finalized_text(" Bye", stream_end=True)
    assert out.getvalue() == " Hug the Horse.\n\n Bye\n"


def test_answers_stream_word_by_word_and_stop_at_the_token_limit(tiny_dir, tokenizer):
    word = word_id(tokenizer, " help")
    model = constant_model(tiny_dir, word)
    out, err = io.StringIO(), io.StringIO()
    history = chat.chat(model, tokenizer, ["Hi", "Again"], out, err, max_new_tokens=6, temperature=0.0)
    assert history == [("Hi", " help help help help help help"), ("Again", " help help help help help help")]
    assert out.getvalue() == "".join(f"Assistant:{answer}\n" for _, answer in history)
    notes = err.getvalue().splitlines()
    assert [n.split(":")[0] for n in notes] == ["[turn 1", "[turn 2"]
    assert all("answer 6 tokens, stopped at max_new_tokens" in n for n in notes)
    # the second prompt holds the whole first turn: it is longer by that turn plus the new one
    first = len(tokenizer(chat.format_conversation([], "Hi"), add_special_tokens=False).input_ids)
    second = len(
        tokenizer(chat.format_conversation(history[:1], "Again"), add_special_tokens=False).input_ids
    )
    assert f"prompt {first} tokens" in notes[0] and f"prompt {second} tokens" in notes[1] and second > first

    # streaming: the answer reaches the output in several writes, and they add up to the stored answer
    stream = io.StringIO()
    streamer = chat.AnswerStreamer(tokenizer, stream)
    result = prompt_eval.generate(
        model, tokenizer, "\n\nHuman: Hi\n\nAssistant:", max_new_tokens=6, streamer=streamer
    )
    assert streamer.writes >= 3
    assert stream.getvalue() == result.text + "\n"


def test_answer_stops_at_eos_and_commands_clear_and_quit(tiny_dir, tokenizer):
    model = constant_model(tiny_dir, tokenizer.eos_token_id)
    out, err = io.StringIO(), io.StringIO()
    lines = ["first", "second", "clear", "third", "quit", "never read"]
    history = chat.chat(model, tokenizer, lines, out, err, max_new_tokens=5, temperature=0.7, echo=True)
    assert history == [("third", "")]  # 'clear' forgot the first two turns; nothing after 'quit'
    assert "never read" not in out.getvalue()
    assert out.getvalue().count("Human: ") == 5 and out.getvalue().count("Assistant:") == 3
    assert err.getvalue().count("answer 1 tokens, stopped at eos") == 3
    assert "[history cleared]" in err.getvalue()


@pytest.mark.slow
def test_chat_answers_a_piped_two_turn_conversation(tiny_dir):
    proc = subprocess.run(
        [sys.executable, "chat.py", "--path", str(tiny_dir), "--max_new_tokens", "8", "--temperature", "0.7"],
        input="How do I bake bread?\nAnd cookies?\n",
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "Human: How do I bake bread?" and lines[1].startswith("Assistant:")
    turn_2 = lines.index("Human: And cookies?")
    assert lines[turn_2 + 1].startswith("Assistant:")
    notes = [line for line in proc.stderr.splitlines() if line.startswith("[turn ")]
    assert len(notes) == 2
    lengths = [int(n.split("prompt ")[1].split(" tokens")[0]) for n in notes]
    assert lengths[1] > lengths[0]  # the second prompt carries the first turn


# ------------------------------------------------------------------ prompt_eval


def test_prompts_files_and_wrapping(tmp_path):
    assert prompt_eval.wrap_prompt("  How? ") == "\n\nHuman: How?\n\nAssistant:"
    wrapped = "\n\nHuman: Hi\n\nAssistant:"
    assert prompt_eval.wrap_prompt(wrapped) == wrapped
    txt = tmp_path / "p.txt"
    txt.write_text("How do I swim?\n\n\\n\\nHuman: Hi\\n\\nAssistant:\n")
    assert prompt_eval.read_prompts(txt) == ["How do I swim?", wrapped]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "One"}) + "\n" + "{oops\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: not valid JSON"):
        prompt_eval.read_prompts(jsonl)
    jsonl.write_text(json.dumps({"prompt": "One"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: field 'prompt' is missing, empty or not a string"):
        prompt_eval.read_prompts(jsonl)
    jsonl.write_text(json.dumps(["One"]) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: expected a JSON object, got a list"):
        prompt_eval.read_prompts(jsonl)
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(ValueError, match="unsupported prompts file type '.csv'"):
        prompt_eval.read_prompts(tmp_path / "p.csv")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty.txt: no prompts found"):
        prompt_eval.read_prompts(tmp_path / "empty.txt")


def test_side_by_side_columns():
    text = prompt_eval.side_by_side("left", "aaa bbb ccc", "right", "x", width=8)
    assert text.splitlines() == [
        "left     | right",
        "-------- | --------",
        "aaa bbb  | x",
        "ccc      |",
    ]


@pytest.mark.slow
def test_prompt_eval_prints_both_models_answers(tiny_dir, tmp_path):
    other = write_tiny(tmp_path / "other", arch="opt", seed=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I clean a cast iron pan?\nIs there an easy way to save money each month?\n")
    proc = subprocess.run(
        [
            sys.executable, "step1_sft/prompt_eval.py", "--model_name_or_path_baseline", str(tiny_dir),
            "--model_name_or_path_finetune", str(other), "--prompts_file", str(prompts), "--max_new_tokens", "6",
            "--width", "400",
        ],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("=== prompt ") == 2 and "=== prompt 2/2: Human: Is there an easy way" in out
    assert out.count(f"baseline: {tiny_dir} (") == 2
    assert out.count(f"fine-tuned: {other} (") == 2
    # the printed answers are the greedy answers of each model
    for path in (tiny_dir, other):
        model, tok, _ = prompt_eval.load_for_generation(str(path), "fp32")
        answer = prompt_eval.generate(
            model, tok, prompt_eval.wrap_prompt("How do I clean a cast iron pan?"), max_new_tokens=6
        )
        assert " ".join(answer.text.split()) in " ".join(out.split())


# ------------------------------------------------------------------ the PPO plot

METRICS = {
    "before": {"score": 0.1},
    "after": {"score": 0.9},
    "score_gain": 0.8,
    "final_kl": 2.0,
    "evals": [
        {"step": 0, "score": 0.1, "response_length": 10.0},
        {"step": 3, "score": 0.9, "response_length": 14.0},
    ],
    "history": [
        {"step": 1, "score_mean": 0.2, "kl": 0.0, "response_length": 11.0},
        {"step": 2, "score_mean": 0.5, "kl": 1.0, "response_length": 12.5},
        {"step": 3, "score_mean": 0.8, "kl": 2.0, "response_length": 13.0},
    ],
}


def test_plot_series_are_the_metrics_points():
    series = plot.curve_series(PolicyMetrics.from_dict(METRICS))
    assert series["score_mean"] == {
        "train": ([1.0, 2.0, 3.0], [0.2, 0.5, 0.8]),
        "eval": ([0.0, 3.0], [0.1, 0.9]),
    }
    assert series["kl"] == {"train": ([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])}
    assert series["response_length"]["eval"] == ([0.0, 3.0], [10.0, 14.0])


def test_plot_png_shows_coloured_curves(tmp_path):
    (tmp_path / "ppo_metrics.json").write_text(json.dumps(METRICS))
    png = plot.plot_ppo_curves(tmp_path / "ppo_metrics.json", tmp_path / "curves.png")
    image = matplotlib.image.imread(png)[..., :3]
    assert image.shape[:2] == (420, 1500)
    blue = np.all(np.abs(image - np.array([31, 119, 180]) / 255) < 0.05, axis=-1)  # tab:blue lines
    red = np.all(np.abs(image - np.array([214, 39, 40]) / 255) < 0.05, axis=-1)  # tab:red eval markers
    thirds = np.array_split(np.arange(image.shape[1]), 3)
    for cols in thirds:  # each panel has a curve
        assert blue[:, cols].sum() > 50
    assert red[:, thirds[0]].sum() > 50 and red[:, thirds[2]].sum() > 50 and red[:, thirds[1]].sum() == 0

    (tmp_path / "bad.json").write_text(json.dumps({"before": {}, "after": {}}))  # DPO's: no history
    with pytest.raises(ValueError, match="bad.json: no 'history' list"):
        plot.load_metrics(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"before": {}}))
    with pytest.raises(ValueError, match="bad.json: no 'after'"):
        plot.load_metrics(tmp_path / "bad.json")
