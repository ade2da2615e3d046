"""The data layer on the bundled synthetic dataset with the project's tiny tokenizer (conftest fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from common.data import DataConfig, Row, build_stage_data, collator_for_stage
from common.data.tokenize import tokenize_sft

SYNTHETIC = Path(__file__).resolve().parents[4] / "data" / "synthetic"


@pytest.fixture(scope="module")
def built(tiny_tokenizer, tmp_path_factory):
    if not (SYNTHETIC / "train.jsonl").exists():
        pytest.skip("data/synthetic is not there yet")
    cfg = DataConfig(data_path=[str(SYNTHETIC)], data_output_path=str(tmp_path_factory.mktemp("cache")))
    return {stage: build_stage_data(cfg, tiny_tokenizer, stage) for stage in (1, 2, 3)}


def test_bundled_data_builds_for_all_stages(built):
    n_train = sum(built[s].stats["sources"][str(SYNTHETIC)]["stage_train_rows"] for s in (1, 2, 3))
    assert n_train == built[1].stats["sources"][str(SYNTHETIC)]["train_rows"]
    for stage in (1, 2, 3):
        assert len(built[stage].train) > 0 and len(built[stage].eval) > 0


def test_bundled_batches_have_one_eos_per_target_and_left_padded_prompts(built, tiny_tokenizer):
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    for stage in (1, 2):
        batch = next(
            iter(DataLoader(built[stage].train, batch_size=16, collate_fn=collator_for_stage(stage, pad)))
        )
        lengths = batch["attention_mask"].sum(1)
        for row, n in zip(batch["input_ids"], lengths, strict=True):
            assert row[n - 1] == eos and (row[:n] == eos).sum() == 1 and (row[n:] == pad).all()
    batch = next(iter(DataLoader(built[3].train, batch_size=16, collate_fn=collator_for_stage(3, pad))))
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["input_ids"] != eos).all()
    assert (batch["attention_mask"] == 0).any()  # prompts of different lengths: some left padding


def test_tiny_tokenizer_literal_eos_in_text_is_not_an_eos_id(tiny_tokenizer):
    row = Row("\n\nHuman: what is <|endoftext|>?\n\nAssistant:", " a marker <|endoftext|> here", None, "test")
    out, _ = tokenize_sft([row], tiny_tokenizer, 512)
    assert out["input_ids"][0].count(tiny_tokenizer.eos_token_id) == 1
    assert out["input_ids"][0][-1] == tiny_tokenizer.eos_token_id
