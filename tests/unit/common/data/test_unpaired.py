"""KTO's unpaired rows (prompt, completion, label) through the data layer: the row schema and its refusals, a
file of unpaired rows mixed with pairs (each pair split into a desirable and an undesirable row), the stages
that refuse unpaired rows, and the collator."""

from __future__ import annotations

import pytest
import torch

from common.data import DataConfig, DataError, UnpairedCollator, build_stage_data
from common.data.rows import RowError, make_row
from tests.data_files import make_tokenizer, pair_rows, write_jsonl


@pytest.fixture
def tok():
    return make_tokenizer()


def cfg_for(tmp_path, path, **kw) -> DataConfig:
    return DataConfig(data_path=[str(path)], data_output_path=str(tmp_path / "cache"), **kw)


def unpaired_rows(n: int) -> list[dict]:
    """n rows in the unpaired schema: the even ones desirable."""
    return [
        {
            "prompt": f"\n\nHuman: u question {i}?\n\nAssistant:",
            "completion": f" {'Good' if i % 2 == 0 else 'Bad'} answer {i}.",
            "label": i % 2 == 0,
        }
        for i in range(n)
    ]


def test_an_unpaired_row_keeps_its_completion_as_chosen_and_its_label():
    row = make_row({"prompt": "p", "completion": " c", "label": False, "topic": "x"}, "f.jsonl line 3")
    assert (row.prompt, row.chosen, row.rejected, row.label) == ("p", " c", None, False)
    assert row.extra == '{"topic": "x"}'
    assert make_row({"prompt": "p", "chosen": "c"}, "o").label is None  # the other schemas have no label


@pytest.mark.parametrize(
    ("record", "column", "problem"),
    [
        ({"prompt": "p", "completion": "c"}, "label", "missing column"),
        ({"prompt": "p", "label": True}, "completion", "missing column"),
        ({"prompt": "p", "completion": "c", "label": "yes"}, "label", "expected true or false"),
        ({"prompt": "p", "completion": "c", "label": 1}, "label", "expected true or false"),
        ({"prompt": "p", "completion": "  ", "label": True}, "completion", "empty"),
        ({"prompt": "p", "completion": "c", "label": True, "chosen": "d"}, "chosen", "not both"),
    ],
)
def test_bad_unpaired_rows_name_the_column_and_the_problem(record, column, problem):
    with pytest.raises(RowError) as e:
        make_row(record, "o")
    assert e.value.column == column and problem in e.value.problem


def test_kto_data_takes_unpaired_rows_and_splits_each_pair_in_two(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", unpaired_rows(20) + pair_rows(20))
    data = build_stage_data(cfg_for(tmp_path, path, data_split="0,1,0"), tok, 2, unpaired=True)
    train = [data.train[i] for i in range(len(data.train))]
    evals = [data.eval[i] for i in range(len(data.eval))]
    source = data.stats["sources"][str(path)]
    rows_in = source["stage_train_rows"] + source["eval_rows"]  # 40 rows, 9:1
    pairs_in = sum(1 for item in train + evals if "Good answer" in tok.decode(item["input_ids"]))
    assert len(train) + len(evals) == 40 + 20  # the 20 pairs gave two rows each
    for item in train + evals:
        text = tok.decode(item["input_ids"])
        assert bool(item["desirable"]) == ("Good answer" in text), text  # the label came with its completion
        assert item["input_ids"][-1].item() == tok.eos_token_id
        assert text[: text.index("Assistant:")].startswith("\n\nHuman:")
        assert int(item["prompt_len"]) < len(item["input_ids"])
    assert rows_in == 40 and pairs_in == 30  # 10 desirable unpaired rows + 20 chosen responses
    batch = UnpairedCollator(tok.pad_token_id)(train[:3])
    assert batch["input_ids"].shape[0] == 3 and batch["desirable"].dtype == torch.bool
    assert batch["desirable"].tolist() == [bool(item["desirable"]) for item in train[:3]]
    assert batch["prompt_lens"].tolist() == [int(item["prompt_len"]) for item in train[:3]]
    assert batch["attention_mask"].sum(1).tolist() == [len(item["input_ids"]) for item in train[:3]]
    again = build_stage_data(cfg_for(tmp_path, path, data_split="0,1,0"), tok, 2, unpaired=True)
    assert again.stats["from_cache"] and len(again.train) == len(data.train)
    pairs = build_stage_data(cfg_for(tmp_path, pair_rows_file(tmp_path)), tok, 2)
    assert not pairs.stats["from_cache"]  # the pair dataset of stage 2 has its own cache


def pair_rows_file(tmp_path):
    return write_jsonl(tmp_path / "pairs" / "p.jsonl", pair_rows(20))


@pytest.mark.parametrize("stage", [1, 2])
def test_stages_that_cannot_use_unpaired_rows_refuse_them_naming_the_row(tmp_path, tok, stage):
    path = write_jsonl(tmp_path / "d.jsonl", pair_rows(5) + unpaired_rows(3))
    with pytest.raises(DataError, match=rf"d.jsonl line 6: an unpaired row .* stage {stage} cannot use"):
        build_stage_data(cfg_for(tmp_path, path), tok, stage)
    assert len(build_stage_data(cfg_for(tmp_path, path), tok, 3).train) > 0  # stage 3 reads the prompts


def test_unpaired_is_stage_two_only(tmp_path, tok):
    with pytest.raises(ValueError, match="stage 2's"):
        build_stage_data(cfg_for(tmp_path, pair_rows_file(tmp_path)), tok, 1, unpaired=True)
