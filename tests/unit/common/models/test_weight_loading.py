"""No model the user names loads with random weights in it.

A checkpoint that lacks a weight the model needs, or holds one it has no place for, is a WeightsMismatchError
naming the path and the keys, in every loader (causal LM: actor, reference, SFT; trunk: reward model, critic),
with and without ZeRO-3; what a model rebuilds or drops by design (a tied LM head, old rotary buffers, a
causal LM's head under a reward trunk) still loads. DeepSpeed-Chat's step-2 reward model (`rwtransformer.*`,
`v_head.weight`) is converted, on load and by `python -m tools.convert_dschat`, to trunk + our head with
bias 0, whose scores are v_head . h(last token) computed by hand here."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from common.models.loading import load_causal_lm, load_tokenizer
from common.models.reward_model import DSCHAT_SAMPLE, RewardModel, load_reward_model_for_training
from common.models.weights import (
    DSCHAT_HEAD_KEY,
    WeightsMismatchError,
    _without_task_head,
    from_pretrained_checked,
    is_dschat_reward_layout,
)
from tests.runs.test_generation_speed import rank0_of_1  # noqa: F401  (fixture: rank 0 of a 1-rank group)
from tools import convert_dschat

ROWS = [[5, 17, 42, 8, 99, 23], [7, 301, 12]]  # token ids of two sequences of different lengths
FC1 = "decoder.layers.0.fc1.weight"  # a trunk weight of the tiny OPT; the causal LM has it under "model."


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(str(tiny_dir))


@pytest.fixture
def load_reports() -> Iterator[list[str]]:
    """The LOAD REPORT tables transformers logs (it prints them to the terminal, past pytest's capture)."""
    reports: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: (
        reports.append(str(record.msg)) if "LOAD REPORT" in str(record.msg) else None
    )
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    yield reports
    logger.removeHandler(handler)


def _variant(tiny_dir: Path, out: Path, edit_weights=None, edit_config=None) -> Path:
    """A copy of the tiny model directory with its state dict and/or config.json edited."""
    shutil.copytree(tiny_dir, out)
    if edit_weights is not None:
        weights = load_file(out / "model.safetensors")
        save_file(edit_weights(weights), out / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps(edit_config(config)))
    return out


def _load_causal(path: Path, tok, **kw):
    return load_causal_lm(str(path), tok, **kw)


def _load_trunk(path: Path, tok, **kw):
    return load_reward_model_for_training(str(path), tok, **kw)


LOADERS = {"causal_lm": (_load_causal, "model."), "reward_trunk": (_load_trunk, "")}


# ------------------------------------------------------------------ what loads and what does not


def test_tied_lm_head_absent_from_the_checkpoint_loads(tiny_dir, tok):
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert json.loads((tiny_dir / "config.json").read_text()).get("tie_word_embeddings", True)
    model = load_causal_lm(str(tiny_dir), tok)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("loader", LOADERS)
def test_a_missing_weight_is_an_error_naming_it_and_the_path(loader, tiny_dir, tok, tmp_path):
    load, prefix = LOADERS[loader]
    path = _variant(tiny_dir, tmp_path / "m", lambda sd: {k: v for k, v in sd.items() if not k.endswith(FC1)})
    with pytest.raises(
        WeightsMismatchError,
        match=rf"^{re.escape(str(path))}: .*1 weights of the model are not in it \({prefix}{FC1}\)",
    ):
        load(path, tok)


@pytest.mark.parametrize("loader", LOADERS)
def test_an_extra_weight_is_an_error_naming_it_and_the_path(loader, tiny_dir, tok, tmp_path):
    load, _ = LOADERS[loader]
    extra = "model.decoder.layers.0.extra.weight"  # inside the trunk's prefix: not a task head
    path = _variant(tiny_dir, tmp_path / "x", lambda sd: {**sd, extra: torch.zeros(3)})
    with pytest.raises(
        WeightsMismatchError, match=rf"^{re.escape(str(path))}: .*1 weights in it have no place .*\({extra}\)"
    ):
        load(path, tok)


def test_a_weight_of_the_wrong_shape_stops_the_load_with_transformers_report(
    tiny_dir, tok, tmp_path, load_reports
):
    path = _variant(tiny_dir, tmp_path / "s", lambda sd: {**sd, f"model.{FC1}": torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        load_causal_lm(str(path), tok)
    assert len(load_reports) == 1 and f"from: {path}" in load_reports[0]
    assert f"model.{FC1} | MISMATCH" in load_reports[0]


def test_untied_lm_head_must_be_in_the_checkpoint_but_a_trunk_drops_it(tiny_dir, tok, tmp_path):
    def untie(config):
        return {**config, "tie_word_embeddings": False}

    headless = _variant(tiny_dir, tmp_path / "headless", edit_config=untie)
    with pytest.raises(WeightsMismatchError, match=r"not in it \(lm_head\.weight\)"):
        load_causal_lm(str(headless), tok)

    def add_head(sd):
        return {**sd, "lm_head.weight": 2 * sd["model.decoder.embed_tokens.weight"]}

    with_head = _variant(tiny_dir, tmp_path / "with_head", add_head, untie)
    lm = load_causal_lm(str(with_head), tok)
    embeddings = lm.get_input_embeddings().weight
    torch.testing.assert_close(lm.lm_head.weight[: len(tok)], 2 * embeddings[: len(tok)], atol=0, rtol=0)
    rm = load_reward_model_for_training(str(with_head), tok)  # the LM head is the checkpoint's task head
    torch.testing.assert_close(rm.backbone.get_input_embeddings().weight, embeddings, atol=0, rtol=0)


def test_without_task_head_keeps_only_what_is_inside_the_trunk_prefix():
    keys = {"model.a.weight", "model.b.weight", "lm_head.weight", "score.weight"}
    assert _without_task_head({"lm_head.weight", "score.weight", "model.x.weight"}, "model", keys) == {
        "model.x.weight"
    }
    bare = {"a.weight", "v_head.weight"}  # no key under the prefix: a bare trunk, nothing is a task head
    assert _without_task_head({"v_head.weight"}, "model", bare) == {"v_head.weight"}
    assert _without_task_head({"lm_head.weight"}, "", keys) == {"lm_head.weight"}


def test_old_rotary_inv_freq_in_a_checkpoint_is_ignored(tmp_path):
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=32,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # older transformers saved it
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = from_pretrained_checked(AutoModelForCausalLM, tmp_path)
    torch.testing.assert_close(model.lm_head.weight, weights["lm_head.weight"], atol=0, rtol=0)
    weights["model.layers.0.mlp.extra"] = torch.ones(4)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError, match=r"model\.layers\.0\.mlp\.extra"):
        from_pretrained_checked(AutoModelForCausalLM, tmp_path)


def test_stage3_reward_model_needs_a_saved_head(tiny_dir, tok):
    """A causal LM as reward model or critic would score with a random head (stage 2 may start from one)."""
    assert load_reward_model_for_training(str(tiny_dir), tok).value_head.in_features == 192
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(tiny_dir))}: not a reward model: .*value head would be random"
    ):
        load_reward_model_for_training(str(tiny_dir), tok, require_saved_head=True)


# ------------------------------------------------------------------ DeepSpeed-Chat's reward model


def test_dschat_layout_is_recognised_by_its_keys():
    assert is_dschat_reward_layout({"rwtransformer.decoder.x.weight", "v_head.weight"})
    assert not is_dschat_reward_layout({"rwtransformer.decoder.x.weight"})  # no head
    assert not is_dschat_reward_layout({"v_head.weight"})  # no trunk
    assert not is_dschat_reward_layout({"rwtransformer.x", "v_head.weight", "model.decoder.x.weight"})


def _dschat_state_dict(tiny_dir: Path) -> dict[str, torch.Tensor]:
    """What DeepSpeed-Chat's step 2 saves for the tiny trunk: rwtransformer.<trunk key>, v_head.weight (1, d)."""
    trunk = AutoModel.from_pretrained(tiny_dir)
    state = {f"rwtransformer.{k}": v for k, v in trunk.state_dict().items()}
    state[DSCHAT_HEAD_KEY] = torch.randn(1, 192, generator=torch.Generator().manual_seed(5))
    return state


@pytest.fixture(scope="module")
def dschat_dir(tiny_dir, tmp_path_factory) -> Path:
    """A DeepSpeed-Chat step-2 output directory: config.json, pytorch_model.bin, tokenizer files."""
    out = tmp_path_factory.mktemp("dschat_rm")
    torch.save(_dschat_state_dict(tiny_dir), out / "pytorch_model.bin")
    for file in tiny_dir.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, out / file.name)
    return out


def _hand_scores(tiny_dir: Path, dschat_dir: Path) -> torch.Tensor:
    """v_head . (trunk's last hidden state at the last token) for each row of ROWS, run unpadded."""
    trunk = AutoModel.from_pretrained(tiny_dir).eval()
    v_head = torch.load(dschat_dir / "pytorch_model.bin", weights_only=True)[DSCHAT_HEAD_KEY][0]
    with torch.no_grad():
        return torch.stack(
            [trunk(input_ids=torch.tensor([row])).last_hidden_state[0, -1] @ v_head for row in ROWS]
        )


def _scores(rm: RewardModel) -> torch.Tensor:
    """Raw scores of ROWS, right-padded into one batch."""
    width = max(len(r) for r in ROWS)
    ids = torch.tensor([r + [1] * (width - len(r)) for r in ROWS])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ROWS])
    with torch.no_grad():
        return rm.eval()(ids, mask).scores


def test_dschat_reward_model_is_converted_on_load(tiny_dir, dschat_dir, tok, capsys, load_reports):
    rm = load_reward_model_for_training(
        str(dschat_dir), tok, allow_pickle_weights=True, require_saved_head=True
    )
    out = capsys.readouterr().out
    assert out.count("DeepSpeed-Chat reward model") == 1 and f"[model] {dschat_dir}: " in out
    assert load_reports == []  # transformers' table would call v_head.weight UNEXPECTED
    assert rm.value_head.bias.item() == 0.0
    assert (rm.gain, rm.bias, rm.normalization_sample) == (1.0, 0.0, DSCHAT_SAMPLE)
    torch.testing.assert_close(_scores(rm), _hand_scores(tiny_dir, dschat_dir), atol=1e-5, rtol=1e-5)


def test_dschat_reward_model_as_a_causal_lm_is_an_error_naming_the_layout(dschat_dir, tok):
    with pytest.raises(WeightsMismatchError) as error:
        load_causal_lm(str(dschat_dir), tok, allow_pickle_weights=True)
    message = str(error.value)
    assert message.startswith(f"{dschat_dir}: its weights do not fit OPTForCausalLM")
    assert (
        "model.decoder.embed_tokens.weight" in message and "rwtransformer.decoder.embed_positions" in message
    )
    assert "It is a DeepSpeed-Chat reward model" in message and "python -m tools.convert_dschat" in message


def test_dschat_pickle_weights_need_allow_pickle_weights(dschat_dir, tok):
    with pytest.raises(FileNotFoundError, match=r"no weights file .*only with --allow_pickle_weights"):
        load_reward_model_for_training(str(dschat_dir), tok)


def test_convert_dschat_command(tiny_dir, dschat_dir, tmp_path, capsys):
    dst = tmp_path / "converted"
    assert convert_dschat.main([str(dschat_dir), str(dst)]) == 1  # pickle weights refused
    assert "--allow_pickle_weights" in capsys.readouterr().err and not dst.exists()
    assert convert_dschat.main([str(tiny_dir), str(dst)]) == 1
    assert f"{tiny_dir}: not a DeepSpeed-Chat reward model" in capsys.readouterr().err

    assert convert_dschat.main([str(dschat_dir), str(dst), "--allow_pickle_weights"]) == 0
    assert {"model.safetensors", "value_head.safetensors", "config.json", "tokenizer.json"} <= {
        p.name for p in dst.iterdir()
    }
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        assert FC1 in f.keys() and not any(k.startswith("rwtransformer.") for k in f.keys())
    assert (dst / "tokenizer.json").read_bytes() == (dschat_dir / "tokenizer.json").read_bytes()
    rm = RewardModel.from_pretrained(dst, require_saved_head=True)  # safetensors only, no flag needed
    assert (rm.gain, rm.bias, rm.normalization_sample) == (1.0, 0.0, DSCHAT_SAMPLE)
    torch.testing.assert_close(_scores(rm), _hand_scores(tiny_dir, dschat_dir), atol=1e-5, rtol=1e-5)
    assert convert_dschat.main([str(dschat_dir), str(dst), "--allow_pickle_weights"]) == 1  # not empty
    assert "not an empty directory" in capsys.readouterr().err


# ------------------------------------------------------------------ ZeRO-3: the model built partitioned


@pytest.fixture(scope="module")
def zero3_config(rank0_of_1) -> dict:  # noqa: F811
    from common.training.ds_config import train_config

    return train_config(
        zero_stage=3, micro_batch_size=1, gradient_accumulation_steps=1, world_size=1, dtype="fp32"
    )


@pytest.mark.parametrize("loader", LOADERS)
def test_zero3_missing_and_extra_weights_are_errors(loader, zero3_config, tiny_dir, tok, tmp_path):
    load, prefix = LOADERS[loader]
    assert load(tiny_dir, tok, ds_config=zero3_config) is not None
    missing = _variant(
        tiny_dir, tmp_path / "m", lambda sd: {k: v for k, v in sd.items() if not k.endswith(FC1)}
    )
    with pytest.raises(
        WeightsMismatchError, match=rf"^{re.escape(str(missing))}: .*not in it \({prefix}{FC1}\)"
    ):
        load(missing, tok, ds_config=zero3_config)
    extra = _variant(
        tiny_dir, tmp_path / "x", lambda sd: {**sd, "model.decoder.extra.weight": torch.zeros(3)}
    )
    with pytest.raises(
        WeightsMismatchError,
        match=rf"^{re.escape(str(extra))}: .*no place .*\(model\.decoder\.extra\.weight\)",
    ):
        load(extra, tok, ds_config=zero3_config)


def test_zero3_dschat_reward_model_is_converted(zero3_config, tiny_dir, dschat_dir, tok):
    import deepspeed

    rm = load_reward_model_for_training(
        str(dschat_dir), tok, ds_config=zero3_config, allow_pickle_weights=True
    )
    fc1 = rm.backbone.get_submodule("decoder.layers.0.fc1").weight
    assert hasattr(fc1, "ds_id")  # partitioned
    with deepspeed.zero.GatheredParameters([fc1]):
        torch.testing.assert_close(
            fc1.data, load_file(tiny_dir / "model.safetensors")[f"model.{FC1}"], atol=0, rtol=0
        )
    v_head = torch.load(dschat_dir / "pytorch_model.bin", weights_only=True)[DSCHAT_HEAD_KEY]
    torch.testing.assert_close(rm.value_head.weight.data, v_head, atol=0, rtol=0)


# ------------------------------------------------------------------ stage 3's engines


def _engines(actor: Path, critic: Path, out: Path, tok):
    from step3_rlhf.args import parse_args
    from step3_rlhf.engines import build_engines

    flags = ["--actor_model_name_or_path", str(actor), "--critic_model_name_or_path", str(critic)]
    args = parse_args([*flags, "--allow_pickle_weights", "--output_dir", str(out), "--dtype", "fp32"])
    return build_engines(args, tok, 1, 1)


@pytest.mark.usefixtures("rank0_of_1")
def test_stage3_engines_convert_a_dschat_critic_and_reward_model(tiny_dir, dschat_dir, tok, tmp_path, capsys):
    engines = _engines(tiny_dir, dschat_dir, tmp_path, tok)
    assert capsys.readouterr().out.count(f"[model] {dschat_dir}: a DeepSpeed-Chat reward model") == 2
    v_head = torch.load(dschat_dir / "pytorch_model.bin", weights_only=True)[DSCHAT_HEAD_KEY]
    critic = engines.critic.module
    torch.testing.assert_close(critic.value_head.weight.data, v_head, atol=0, rtol=0)
    assert critic.value_head.bias.item() == 0.0
    torch.testing.assert_close(
        _scores(engines.reward.module), _hand_scores(tiny_dir, dschat_dir), atol=1e-5, rtol=1e-5
    )


@pytest.mark.usefixtures("rank0_of_1")
def test_stage3_engines_refuse_a_causal_lm_as_reward_model(tiny_dir, tok, tmp_path):
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tiny_dir))}: not a reward model"):
        _engines(tiny_dir, tiny_dir, tmp_path, tok)
