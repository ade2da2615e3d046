"""Every flag naming a model, a length, a batch size or LoRA layers is checked against
the model's files before any compute (common/validate.py), and pickle weights or model code shipped with a
model are refused unless the user allows them. Each error is a SystemExit naming the flag, path and problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from common.validate import check_tensor_parallel, ppo_model_paths, validate_ppo, validate_sft
from step1_sft.main import parse_args as sft_args
from step2_reward.main import parse_args as reward_args
from step2_reward.validate import validate_reward
from step3_rlhf.args import parse_args as ppo_args
from tests.launch import run_failing_stage


def _copy(tiny_dir: Path, dest: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, dest))


def _sft(model: str | Path, *extra: str):
    return sft_args(["--model_name_or_path", str(model), "--output_dir", "unused", *extra])


def _reward(model: str | Path, *extra: str):
    return reward_args(["--model_name_or_path", str(model), "--output_dir", "unused", *extra])


def _ppo(actor: str | Path, critic: str | Path, *extra: str):
    argv = ["--actor_model_name_or_path", str(actor), "--critic_model_name_or_path", str(critic)]
    return ppo_args([*argv, "--output_dir", "unused", *extra])


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def test_the_tiny_model_passes_every_stage(tiny_dir):
    validate_sft(_sft(tiny_dir, "--lora_dim", "4"))
    validate_reward(_reward(tiny_dir, "--lora_dim", "4", "--normalization_policy_path", str(tiny_dir)))
    validate_ppo(
        _ppo(tiny_dir, tiny_dir, "--reward_model_name_or_path", str(tiny_dir), "--actor_lora_dim", "4")
    )


# ------------------------------------------------------------------------------------------ model paths


def _broken_model(kind: str, tiny_dir: Path, tmp_path: Path) -> Path:
    """A model path that is wrong in the way `kind` says."""
    if kind == "missing":
        return tmp_path / "no_such_model"
    if kind == "a file":
        return Path(shutil.copy(tiny_dir / "config.json", tmp_path / "model.json"))
    model = _copy(tiny_dir, tmp_path / kind.replace(" ", "_"))
    if kind == "no config.json":
        (model / "config.json").unlink()
    elif kind == "unreadable config.json":
        (model / "config.json").unlink()
        (model / "config.json").mkdir()  # reading it fails with an OSError, also for root
    elif kind == "truncated config.json":
        (model / "config.json").write_text((tiny_dir / "config.json").read_text()[:50])
    elif kind == "no weights":
        (model / "model.safetensors").unlink()
    elif kind == "no tokenizer":
        (model / "tokenizer.json").unlink()
        (model / "tokenizer_config.json").unlink()
    return model


MODEL_PATH_ERRORS = {
    "missing": "no such directory",
    "a file": "is a file; expected a model directory",
    "no config.json": "no config.json in it",
    "unreadable config.json": r"config.json: cannot read it \(\[Errno 21\] Is a directory",
    "truncated config.json": r"config.json: cannot read it \(",
    "no weights": r"no model weights in it \(model.safetensors",
    "no tokenizer": "cannot load its tokenizer",
}


@pytest.mark.parametrize("kind", sorted(MODEL_PATH_ERRORS))
def test_bad_model_path_names_flag_path_and_problem(kind, tiny_dir, tmp_path):
    model = _broken_model(kind, tiny_dir, tmp_path)
    with pytest.raises(SystemExit, match=f"^--model_name_or_path {model}.*{MODEL_PATH_ERRORS[kind]}"):
        validate_sft(_sft(model))


@pytest.mark.parametrize(
    "flag", ["--actor_model_name_or_path", "--critic_model_name_or_path", "--reward_model_name_or_path"]
)
def test_each_stage3_model_flag_is_checked(flag, tiny_dir, tmp_path):
    missing = str(tmp_path / "missing")
    paths = {"--actor_model_name_or_path": str(tiny_dir), "--critic_model_name_or_path": str(tiny_dir)}
    paths[flag] = missing
    argv = [x for item in paths.items() for x in item] + ["--output_dir", "unused"]
    with pytest.raises(SystemExit, match=f"^{flag} {missing}: no such directory"):
        validate_ppo(ppo_args(argv))


def test_stage2_checks_the_normalisation_policy_only_when_it_is_used(tiny_dir, tmp_path):
    missing = str(tmp_path / "missing_sft")
    with pytest.raises(SystemExit, match=f"^--normalization_policy_path {missing}: no such directory"):
        validate_reward(_reward(tiny_dir, "--normalization_policy_path", missing))
    validate_reward(
        _reward(tiny_dir, "--normalization_policy_path", missing, "--normalization_sample", "chosen")
    )


@pytest.fixture
def offline_hub(tiny_dir, tmp_path, monkeypatch) -> Path:
    """An offline Hugging Face cache holding the tiny model as the hub repo 'testorg/tiny'."""
    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--testorg--tiny"
    shutil.copytree(tiny_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_hub_id_goes_through_hub_loading(offline_hub):
    from common.models.loading import load_causal_lm, load_tokenizer

    validate_sft(_sft("testorg/tiny"))  # not a local path: config and tokenizer come from the hub cache
    tok = load_tokenizer("testorg/tiny")
    model = load_causal_lm("testorg/tiny", tok)
    assert model.config.vocab_size == len(tok)  # the tiny model's: weights really came from the hub cache


@pytest.mark.parametrize("name", ["testorg/not-there", "out/typo", "org/bad id!"])
def test_hub_id_that_fails_to_load_names_the_flag(offline_hub, name):
    with pytest.raises(
        SystemExit,
        match=f"^--model_name_or_path {name}: no such local directory, and loading it from the Hugging Face hub failed: ",
    ):
        validate_sft(_sft(name))


# ----------------------------------------------------------------------------------- tokenizers, vocab


def test_tokenizer_with_ids_beyond_the_model_vocabulary(tiny_dir, tmp_path):
    model = _copy(tiny_dir, tmp_path / "small_vocab")
    _edit_config(model, vocab_size=1000)
    top = len(AutoTokenizer.from_pretrained(tiny_dir)) - 1  # the tiny tokenizer's largest id
    with pytest.raises(
        SystemExit,
        match=f"^--model_name_or_path {model}: .*token ids up to {top} \\(added tokens not counted\\), but .*vocab_size 1000",
    ):
        validate_sft(_sft(model))
    with pytest.raises(SystemExit, match="vocab_size 1000"):
        validate_ppo(_ppo(tiny_dir, model))  # the critic reads the actor's ids


@pytest.mark.parametrize("pad", ["added by load_tokenizer", "saved beyond vocab_size"])
def test_pad_token_beyond_the_vocabulary_is_not_a_mismatch(pad, tmp_path):
    """A model whose config.vocab_size is exactly its tokenizer's base vocabulary, with no pad token (load_tokenizer
    adds one) or with a pad token saved past vocab_size: the loader resizes the embeddings, validation accepts it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    from common.models.loading import load_causal_lm, load_tokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False)
    backend.train_from_iterator(["Human: hello there. Assistant: hi, how can I help?"] * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    vocab_size = len(tok)
    if pad == "saved beyond vocab_size":
        tok.add_special_tokens({"pad_token": "<pad>"})
    config = OPTConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       ffn_dim=32, max_position_embeddings=64, word_embed_proj_dim=16)  # fmt: skip
    OPTForCausalLM(config).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    validate_sft(_sft(tmp_path / "m", "--max_seq_len", "64"))
    loaded = load_tokenizer(str(tmp_path / "m"))
    assert loaded.pad_token_id == vocab_size  # one past config.vocab_size
    model = load_causal_lm(str(tmp_path / "m"), loaded)
    assert model.get_input_embeddings().num_embeddings > loaded.pad_token_id


@pytest.fixture
def other_tokenizer_model(tiny_dir, tmp_path) -> Path:
    """The tiny model with one token added to its tokenizer."""

    model = _copy(tiny_dir, tmp_path / "other_tok")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(model)
    return model


@pytest.mark.parametrize("flag", ["--critic_model_name_or_path", "--reward_model_name_or_path"])
def test_critic_and_reward_tokenizers_must_be_the_actors(flag, tiny_dir, other_tokenizer_model):
    paths = {"--critic_model_name_or_path": str(tiny_dir), flag: str(other_tokenizer_model)}
    argv = ["--actor_model_name_or_path", str(tiny_dir), *[x for item in paths.items() for x in item]]
    n = len(AutoTokenizer.from_pretrained(tiny_dir))
    with pytest.raises(
        SystemExit,
        match=f"^{flag} {other_tokenizer_model}: its tokenizer differs from the one of --actor_model_name_or_path "
        rf"{tiny_dir} \({n} vs {n + 1} tokens; '<extra>' has id None vs {n}\)",
    ):
        validate_ppo(ppo_args([*argv, "--output_dir", "unused"]))


def test_normalisation_policy_tokenizer_must_be_the_reward_models(tiny_dir, other_tokenizer_model):
    args = _reward(tiny_dir, "--normalization_policy_path", str(other_tokenizer_model))
    with pytest.raises(
        SystemExit, match=f"^--normalization_policy_path {other_tokenizer_model}: its tokenizer differs"
    ):
        validate_reward(args)


# ----------------------------------------------------------------------------- lengths and batch sizes


def test_sequence_longer_than_the_model_positions(tiny_dir):
    with pytest.raises(
        SystemExit,
        match=f"^--max_seq_len 513 is longer than the 512 positions of --model_name_or_path {tiny_dir}",
    ):
        validate_sft(_sft(tiny_dir, "--max_seq_len", "513"))
    with pytest.raises(SystemExit, match="^--max_seq_len 600 is longer than the 512 positions"):
        validate_reward(_reward(tiny_dir, "--max_seq_len", "600"))
    validate_sft(_sft(tiny_dir, "--max_seq_len", "512"))


def test_prompt_must_leave_room_for_the_answer(tiny_dir):
    args = _ppo(tiny_dir, tiny_dir, "--max_prompt_seq_len", "500", "--max_answer_seq_len", "13")
    with pytest.raises(
        SystemExit,
        match=r"^--max_prompt_seq_len 500 \+ --max_answer_seq_len 13 = 513 tokens \(the prompt must leave room "
        f"for the answer\\) is longer than the 512 positions of --actor_model_name_or_path {tiny_dir}",
    ):
        validate_ppo(args)
    validate_ppo(_ppo(tiny_dir, tiny_dir, "--max_prompt_seq_len", "500", "--max_answer_seq_len", "12"))


@pytest.mark.parametrize(
    "parse, argv, message",
    [
        (_sft, ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1 (got 0)"),
        (_sft, ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1 (got 0)"),
        (
            _reward,
            ["--per_device_eval_batch_size", "-1"],
            "--per_device_eval_batch_size must be >= 1 (got -1)",
        ),
        (
            _ppo,
            ["--per_device_training_batch_size", "0"],
            "--per_device_training_batch_size must be >= 1 (got 0)",
        ),
        (_ppo, ["--generation_batches", "0"], "--generation_batches must be >= 1 (got 0)"),
        (_ppo, ["--ppo_epochs", "0"], "--ppo_epochs must be >= 1 (got 0)"),
        (_ppo, ["--print_answers_interval", "0"], "--print_answers_interval must be >= 1 (got 0)"),
        (
            _ppo,
            ["--per_device_generation_batch_size", "6", "--per_device_training_batch_size", "4"],
            "per-rank rollout size (--per_device_generation_batch_size 6 x --generation_batches 1 x "
            "--num_samples_per_prompt 1 = 6) must be "
            "a multiple of the PPO minibatch (--per_device_training_batch_size 4 x --gradient_accumulation_steps 1 = 4)",
        ),
    ],
)
def test_batch_sizes_are_refused_when_parsing(parse, argv, message):
    models = ("m", "m") if parse is _ppo else ("m",)
    with pytest.raises(SystemExit) as e:
        parse(*models, *argv)
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--critic_model_name_or_path", "m", "--advantage_estimator", "grpo"],
            "--advantage_estimator grpo compares the answers to one prompt, so it needs --num_samples_per_prompt "
            ">= 2 (got 1)",
        ),
        (
            ["--critic_model_name_or_path", "m", "--num_samples_per_prompt", "0"],
            "--num_samples_per_prompt must be >= 1, got 0",
        ),
        (
            ["--reward_fn", "common.evaluation.gold:synthetic_gold"],
            "--advantage_estimator gae trains a critic: give --critic_model_name_or_path (the reward model of "
            "stage 2)",
        ),
        (
            ["--advantage_estimator", "reinforce_pp"],
            "stage 3 needs a reward: a reward model (--reward_model_name_or_path, or --critic_model_name_or_path) "
            "and/or a reward function (--reward_fn module:function)",
        ),
        (
            [
                "--advantage_estimator",
                "reinforce_pp",
                "--critic_model_name_or_path",
                "m",
                "--reward_model_coef",
                "0",
            ],
            "stage 3 needs a reward: a reward model (--reward_model_name_or_path, or --critic_model_name_or_path) "
            "and/or a reward function (--reward_fn module:function)",
        ),
        (
            ["--critic_model_name_or_path", "m", "--kl_in_loss", "--adaptive_kl"],
            "--adaptive_kl adapts the KL penalty in the reward; with --kl_in_loss there is none",
        ),
    ],
)
def test_estimator_and_reward_settings_are_refused_when_parsing(argv, message):
    with pytest.raises(SystemExit) as e:
        ppo_args(["--actor_model_name_or_path", "m", "--output_dir", "unused", *argv])
    assert str(e.value) == message


def test_each_estimator_loads_only_the_models_it_uses(tiny_dir):
    """A critic-free run validates (and later loads) no critic; a reward function alone needs no reward model;
    the estimator's defaults fill --whiten_advantages and --loss_agg unless given."""
    base = ["--actor_model_name_or_path", str(tiny_dir), "--output_dir", "unused"]
    gae = ppo_args([*base, "--critic_model_name_or_path", str(tiny_dir)])
    assert list(ppo_model_paths(gae)) == ["--actor_model_name_or_path", "--critic_model_name_or_path"]
    assert (gae.whiten_advantages, gae.loss_agg) == (True, "token_mean")
    grpo = ppo_args([*base, "--critic_model_name_or_path", "rm", "--advantage_estimator", "grpo",
                     "--num_samples_per_prompt", "2"])  # fmt: skip
    assert ppo_model_paths(grpo) == {
        "--actor_model_name_or_path": str(tiny_dir),
        "--critic_model_name_or_path": "rm",
    }
    assert (grpo.whiten_advantages, grpo.loss_agg) == (False, "seq_mean_token_mean")
    fn_only = ppo_args([*base, "--advantage_estimator", "dr_grpo", "--num_samples_per_prompt", "2",
                        "--reward_fn", "m:f", "--no-whiten_advantages", "--loss_agg", "token_mean"])  # fmt: skip
    assert ppo_model_paths(fn_only) == {"--actor_model_name_or_path": str(tiny_dir)}
    assert (fn_only.whiten_advantages, fn_only.loss_agg) == (False, "token_mean")
    validate_ppo(fn_only)


def test_hybrid_engine_tensor_parallel_size_must_divide_the_ranks(tiny_dir):
    args = _ppo(tiny_dir, tiny_dir, "--enable_hybrid_engine", "--inference_tp_size", "2")
    with pytest.raises(
        SystemExit, match=r"^--inference_tp_size 2 must be >= 1 and divide the number of ranks \(3\)"
    ):
        check_tensor_parallel(args, world_size=3)
    check_tensor_parallel(args, world_size=4)


# ------------------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize(
    "stage, lora_flags, message",
    [
        ("sft", ["--lora_dim", "4", "--lora_module_name", "nope."], "--lora_module_name 'nope.' matches no Linear layer of OPTForCausalLM"),
        ("reward", ["--lora_dim", "4", "--lora_module_name", "model.decoder."], "--lora_module_name 'model.decoder.' matches no Linear layer of OPTModel"),
        ("ppo", ["--actor_lora_dim", "4", "--actor_lora_module_name", "h."], "--actor_lora_module_name 'h.' matches no Linear layer of OPTForCausalLM"),
        ("ppo", ["--critic_lora_dim", "4", "--critic_lora_module_name", "nope."], "--critic_lora_module_name 'nope.' matches no Linear layer of OPTModel"),
    ],
)  # fmt: skip
def test_lora_module_name_matching_nothing(stage, lora_flags, message, tiny_dir):
    """The reward model adapts its trunk (OPTModel: names start with 'decoder.', not 'model.decoder.')."""
    if stage == "sft":
        run = lambda: validate_sft(_sft(tiny_dir, *lora_flags))  # noqa: E731
    elif stage == "reward":
        run = lambda: validate_reward(_reward(tiny_dir, *lora_flags))  # noqa: E731
    else:
        run = lambda: validate_ppo(_ppo(tiny_dir, tiny_dir, *lora_flags))  # noqa: E731
    with pytest.raises(SystemExit) as e:
        run()
    assert str(e.value).startswith(message) and str(tiny_dir) in str(e.value)


# -------------------------------------------------------------------------------- pickle, code


@pytest.fixture
def pickle_model(tiny_dir, tmp_path) -> Path:
    """The tiny model with its weights in pytorch_model.bin (a pickle) instead of model.safetensors."""
    from safetensors.torch import load_file

    model = _copy(tiny_dir, tmp_path / "pickled")
    state_dict = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(state_dict, model / "pytorch_model.bin")
    return model


def test_pickle_weights_are_refused_without_the_flag(pickle_model):
    from common.models.loading import load_causal_lm, load_tokenizer

    with pytest.raises(
        SystemExit,
        match=rf"^--model_name_or_path {pickle_model}: its weights are pickle files \(pytorch_model.bin\) and it "
        "has no safetensors; unpickling can run arbitrary code. .*--allow_pickle_weights",
    ):
        validate_sft(_sft(pickle_model))
    with pytest.raises(SystemExit, match="its weights are pickle files"):
        validate_reward(_reward(pickle_model))
    with pytest.raises(OSError, match="no file named model.safetensors"):  # the loader itself refuses too
        load_causal_lm(str(pickle_model), load_tokenizer(str(pickle_model)))


def test_pickle_weights_load_with_the_flag(pickle_model, tiny_dir):
    from common.models.loading import load_causal_lm, load_tokenizer
    from common.models.reward_model import load_reward_model_for_training

    validate_sft(_sft(pickle_model, "--allow_pickle_weights"))
    validate_reward(_reward(pickle_model, "--allow_pickle_weights"))
    tok = load_tokenizer(str(pickle_model))
    loaded = load_causal_lm(str(pickle_model), tok, allow_pickle_weights=True)
    reference = load_causal_lm(str(tiny_dir), tok)
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    rm = load_reward_model_for_training(str(pickle_model), tok, allow_pickle_weights=True)
    assert torch.equal(rm.backbone.get_input_embeddings().weight, reference.get_input_embeddings().weight)


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_model_code_shipped_with_a_model_needs_trust_remote_code(file, tiny_dir, tmp_path):
    model = _copy(tiny_dir, tmp_path / "custom_code")
    marker = tmp_path / "code_ran"
    (model / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((model / file).read_text())
    config["auto_map"] = {
        "AutoConfig": "modeling_custom.Config",
        "AutoModelForCausalLM": "modeling_custom.Model",
    }
    (model / file).write_text(json.dumps(config))
    message = (
        f"^--model_name_or_path {model}: its {file} has an 'auto_map', i.e. the model ships its own Python "
        r"code, which is not run without --trust_remote_code"
    )
    with pytest.raises(SystemExit, match=message):
        validate_sft(_sft(model))
    with pytest.raises(SystemExit, match=message):
        validate_reward(_reward(model))
    with pytest.raises(
        SystemExit, match=message.replace("--model_name_or_path", "--critic_model_name_or_path")
    ):
        validate_ppo(_ppo(tiny_dir, model))
    assert not marker.exists()


# ------------------------------------------------------------------------------- as a user runs a stage


@pytest.mark.slow
def test_stage3_run_stops_before_any_data_or_model_work(tiny_dir, pickle_model, tmp_path):
    """`python step3_rlhf/main.py` with a pickle critic: the message, no traceback, no data cache."""
    argv = ["--actor_model_name_or_path", str(tiny_dir), "--critic_model_name_or_path", str(pickle_model)]
    argv += ["--output_dir", str(tmp_path / "out"), "--data_output_path", str(tmp_path / "cache")]
    proc = run_failing_stage("step3_rlhf/main.py", argv)
    assert f"--critic_model_name_or_path {pickle_model}: its weights are pickle files" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_stage2_run_stops_before_any_data_or_model_work(tiny_dir, tmp_path):
    """`python step2_reward/main.py` with a LoRA name that matches nothing: the message, no traceback."""
    argv = ["--model_name_or_path", str(tiny_dir), "--lora_dim", "4", "--lora_module_name", "nope."]
    argv += ["--output_dir", str(tmp_path / "out"), "--data_output_path", str(tmp_path / "cache")]
    proc = run_failing_stage("step2_reward/main.py", argv)
    assert "--lora_module_name 'nope.' matches no Linear layer of OPTModel" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "cache").exists()
