"""The one sampler (common/models/sampling.py): the answer masks after the first EOS, the exact generation settings,
a model's own generation defaults set aside, padded vocabulary rows never sampled, the model's mode kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from common.models.sampling import SamplingSettings, decode_answer, padded_vocab_rows, sample_answers

EOS, PAD = 2, 0


class FakeTokenizer:
    eos_token_id, pad_token_id = EOS, PAD

    def __len__(self) -> int:
        return 10

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (EOS, PAD)))


class FakeModel(nn.Module):
    """Returns fixed answers and records how generate was called."""

    def __init__(self, answers: torch.Tensor, rows: int = 12):
        super().__init__()
        self.head = nn.Linear(4, rows, bias=False)
        self.answers = answers
        self.generation_config = GenerationConfig(repetition_penalty=9.0)
        self.calls: list[dict] = []

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        self.calls.append(
            {"config": generation_config, "own": self.generation_config, "training": self.training, **kwargs}
        )
        return torch.cat([input_ids, self.answers], dim=1)


def test_answers_are_masked_and_padded_after_the_first_eos():
    prompts = torch.tensor([[PAD, 5, 6], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    model = FakeModel(torch.tensor([[4, EOS, 7, EOS], [4, 5, 6, 7]]))
    out = sample_answers(model, FakeTokenizer(), prompts, prompt_mask, SamplingSettings(max_new_tokens=4))
    assert out.prompt_len == 3
    assert out.seq.tolist() == [[PAD, 5, 6, 4, EOS, PAD, PAD], [7, 8, 9, 4, 5, 6, 7]]
    assert out.action_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert out.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert out.ends.tolist() == [True, False]
    assert out.answers.tolist() == [[4, EOS, PAD, PAD], [4, 5, 6, 7]]
    # as a scorer sees them: the EOS dropped from the tokens, special tokens from the text
    assert decode_answer(FakeTokenizer(), out.seq[0], out.action_mask[0], True, 3) == ("5 6", [4], "4")
    assert decode_answer(FakeTokenizer(), out.seq[1], out.action_mask[1], False, 3, "Q?") == (
        "Q?",
        [4, 5, 6, 7],
        "4 5 6 7",
    )


def test_generation_gets_exactly_the_settings_and_the_models_defaults_are_set_aside():
    model = FakeModel(torch.tensor([[4, EOS]]))
    own = model.generation_config
    model.train()
    settings = SamplingSettings(max_new_tokens=2, temperature=0.9, top_k=0, top_p=1.0)
    sample_answers(
        model, FakeTokenizer(), torch.tensor([[5]]), torch.tensor([[1]]), settings, synced_gpus=True
    )
    call = model.calls[0]
    config = call["config"]
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 0.9, 0, 1.0)
    assert (config.max_new_tokens, config.num_beams, config.repetition_penalty) == (2, 1, 1.0)
    assert (config.eos_token_id, config.pad_token_id) == (EOS, PAD)
    assert config.suppress_tokens == [10, 11]  # embedding rows 10 and 11 are past the 10-token vocabulary
    assert call["synced_gpus"] is True
    assert call["own"] is not own and call["own"].repetition_penalty is None  # set aside during the call
    assert model.generation_config is own  # and put back
    assert call["training"] is False and model.training  # generated in eval mode, left as it was


@pytest.mark.parametrize("temperature, do_sample", [(0.0, True), (0.7, False)])
def test_temperature_zero_or_no_sampling_is_greedy(temperature, do_sample):
    model = FakeModel(torch.tensor([[4, EOS]]), rows=10)
    settings = SamplingSettings(max_new_tokens=2, temperature=temperature, do_sample=do_sample, num_beams=3)
    sample_answers(model, FakeTokenizer(), torch.tensor([[5]]), torch.tensor([[1]]), settings)
    config = model.calls[0]["config"]
    assert config.do_sample is False and config.temperature is None and config.num_beams == 3
    assert config.suppress_tokens is None  # no padded rows


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    batch = tok(
        ["\n\nHuman: How do I boil an egg?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:"] * 4,
        return_tensors="pt",
        padding=True,
    )
    return tok, model, batch


def _sample(model, tok, batch, seed: int = 3, **settings):
    torch.manual_seed(seed)
    settings = {"max_new_tokens": 12, "temperature": 1.0, **settings}
    return sample_answers(model, tok, batch.input_ids, batch.attention_mask, SamplingSettings(**settings))


def test_a_models_own_generation_defaults_do_not_change_the_samples(tiny):
    tok, model, batch = tiny
    plain = _sample(model, tok, batch).seq
    skewed = GenerationConfig.from_dict(
        {**model.generation_config.to_dict(), "repetition_penalty": 50.0, "no_repeat_ngram_size": 1}
    )
    with_own, model.generation_config = model.generation_config, skewed
    try:
        assert torch.equal(_sample(model, tok, batch).seq, plain)
        # The control: generate() itself honours those defaults, so the test above can fail.
        torch.manual_seed(3)
        direct = model.generate(
            **batch,
            max_new_tokens=12,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        assert not torch.equal(direct[:, : plain.shape[1]], plain)
    finally:
        model.generation_config = with_own


def test_padded_embedding_rows_are_never_sampled(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    model.resize_token_embeddings(len(tok) + 6)
    assert padded_vocab_rows(model, tok) == list(range(len(tok), len(tok) + 6))
    # Make the padded rows all but certain to be drawn unless they are suppressed.
    boost = torch.zeros(len(tok) + 6)
    boost[len(tok) :] = 100.0
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + boost)
    batch = tok(["\n\nHuman: Hi\n\nAssistant:"] * 4, return_tensors="pt", padding=True)
    try:
        out = _sample(model, tok, batch)
        assert out.answers.max().item() < len(tok)
        torch.manual_seed(3)
        unsuppressed = model.generate(
            **batch,
            max_new_tokens=4,
            do_sample=True,
            top_k=0,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        assert unsuppressed[:, batch.input_ids.shape[1] :].min().item() >= len(tok)  # the control
    finally:
        handle.remove()
