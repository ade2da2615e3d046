"""build_stage_data end to end on local files: stage slices, mixing, sft_only, cache hits and invalidation."""

from __future__ import annotations

import json

import pytest

from common.data import DataConfig, DataError, PromptCollator, build_stage_data
from common.data import tokenize as tokenize_module
from tests.data_files import make_tokenizer, pair_rows, write_jsonl


@pytest.fixture
def tok():
    return make_tokenizer()


def cfg_for(tmp_path, data_path, **kw) -> DataConfig:
    return DataConfig(data_path=[str(p) for p in data_path], data_output_path=str(tmp_path / "cache"), **kw)


def decoded_prompts(tokenizer, dataset, stage) -> list[str]:
    """The prompt text of every item, to identify rows across stages."""
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        if stage == 1:
            ids = item["input_ids"].tolist()
        elif stage == 2:
            ids = item["chosen_input_ids"].tolist()
        else:
            ids = item["input_ids"].tolist()
        text = tokenizer.decode(ids)
        out.append(text[: text.index("Assistant:")])
    return out


def test_three_stages_get_disjoint_slices_and_share_the_eval_split(tmp_path, tok):
    data = tmp_path / "src"
    write_jsonl(data / "train.jsonl", pair_rows(50, "train"))
    write_jsonl(data / "test.jsonl", pair_rows(6, "test"))
    cfg = cfg_for(tmp_path, [data])
    built = {stage: build_stage_data(cfg, tok, stage) for stage in (1, 2, 3)}
    seen = [set(decoded_prompts(tok, built[s].train, s)) for s in (1, 2, 3)]
    assert [len(s) for s in seen] == [10, 20, 20]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert len(set.union(*seen)) == 50
    for s in (1, 2, 3):
        assert len(built[s].eval) == 6  # every stage evaluates on the whole test split
        assert built[s].stats["sources"][str(data)]["stage_train_rows"] == len(built[s].train)


def test_same_result_on_a_second_call_and_a_fresh_cache_dir(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", pair_rows(30))
    a = build_stage_data(cfg_for(tmp_path, [path]), tok, 1)
    b = DataConfig(data_path=[str(path)], data_output_path=str(tmp_path / "other_cache"))
    b = build_stage_data(b, tok, 1)
    assert [a.train[i]["input_ids"].tolist() for i in range(len(a.train))] == [
        b.train[i]["input_ids"].tolist() for i in range(len(b.train))
    ]
    assert a.stats["from_cache"] is False and b.stats["from_cache"] is False


def test_file_without_test_split_is_split_nine_to_one(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", pair_rows(100))
    data = build_stage_data(cfg_for(tmp_path, [path], data_split="10,0,0"), tok, 1)
    assert len(data.train) == 90 and len(data.eval) == 10
    assert not set(decoded_prompts(tok, data.train, 1)) & set(decoded_prompts(tok, data.eval, 1))


def test_cache_hit_does_not_tokenize_again(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", pair_rows(20))
    cfg = cfg_for(tmp_path, [path])
    first = build_stage_data(cfg, tok, 2)

    def boom(*args, **kwargs):
        raise AssertionError("tokenized again on a cache hit")

    monkeypatch.setattr(tokenize_module, "encode_texts", boom)
    second = build_stage_data(cfg, make_tokenizer(), 2)  # an equal tokenizer object hits the cache too
    assert second.stats["from_cache"] is True
    assert [first.train[i]["chosen_input_ids"].tolist() for i in range(len(first.train))] == [
        second.train[i]["chosen_input_ids"].tolist() for i in range(len(second.train))
    ]
    with pytest.raises(AssertionError, match="tokenized again"):  # a changed option misses the cache
        build_stage_data(cfg_for(tmp_path, [path], max_seq_len=64), tok, 2)


def test_changed_file_content_under_the_same_name_rebuilds(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", pair_rows(20, "old"))
    cfg = cfg_for(tmp_path, [path], data_split="10,0,0")
    old = build_stage_data(cfg, tok, 1)
    write_jsonl(path, pair_rows(20, "new"))
    new = build_stage_data(cfg, tok, 1)
    assert new.stats["from_cache"] is False
    assert all("new question" in p for p in decoded_prompts(tok, new.train, 1))
    assert all("old question" in p for p in decoded_prompts(tok, old.train, 1))


def test_mixing_two_local_sources(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", pair_rows(40, "alpha"))
    write_jsonl(tmp_path / "b" / "train.jsonl", pair_rows(20, "beta"))
    write_jsonl(tmp_path / "b" / "test.jsonl", pair_rows(3, "betatest"))
    data = build_stage_data(cfg_for(tmp_path, [a, tmp_path / "b"]), tok, 3)
    prompts = decoded_prompts(tok, data.train, 3)
    n_alpha = sum("alpha" in p for p in prompts)
    n_beta = sum("beta" in p for p in prompts)
    # a.jsonl: 36 train rows after the 9:1 split; stage 3 gets rows [floor(36 * 6/10), 36). b: [12, 20).
    assert (n_alpha, n_beta) == (36 - 21, 20 - 12)
    order = ["alpha" in p for p in prompts]
    assert order != sorted(order) and order != sorted(order, reverse=True)  # mixed, not concatenated
    assert len(data.eval) == 4 + 3
    assert set(data.stats["sources"]) == {str(a), str(tmp_path / "b")}


def test_sft_only_sources_are_used_whole_by_stage_one_only(tmp_path, tok):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(20, "pair"))
    sft_rows = [{"prompt": f"\n\nHuman: sft {i}?\n\nAssistant:", "chosen": f" ok {i}."} for i in range(10)]
    sft = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    cfg = cfg_for(tmp_path, [pairs], sft_only_data_path=[str(sft)])
    stage1 = build_stage_data(cfg, tok, 1)
    prompts = decoded_prompts(tok, stage1.train, 1)
    assert sum("sft" in p for p in prompts) == 9  # all its train rows (9:1 split of 10)
    assert sum("pair" in p for p in prompts) == 3  # 20% of 18
    stage2 = build_stage_data(cfg, tok, 2)
    assert not any("sft" in p for p in decoded_prompts(tok, stage2.train, 2))
    with pytest.raises(ValueError, match="both data_path and sft_only_data_path"):
        build_stage_data(cfg_for(tmp_path, [pairs], sft_only_data_path=[str(pairs)]), tok, 1)


def test_stage_two_leaves_out_rows_without_rejected_and_counts_them(tmp_path, tok, capsys):
    rows = pair_rows(40)
    for r in rows[::2]:
        del r["rejected"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = build_stage_data(cfg_for(tmp_path, [path], data_split="0,1,0"), tok, 2)
    source = data.stats["sources"][str(path)]
    left_out = source["without_rejected"]
    assert left_out["train"] + len(data.train) == source["stage_train_rows"] == 36  # 9:1 split of 40
    assert left_out["eval"] + len(data.eval) == source["eval_rows"] == 4
    assert left_out["train"] + left_out["eval"] == 20  # exactly half: trained on, not an error
    assert data.stats["train_without_rejected"] == left_out["train"] > 0
    assert data.stats["eval_without_rejected"] == left_out["eval"]
    printed = (
        f"[data] {path}: stage 2 left out {left_out['train']} of its 36 train rows and {left_out['eval']} "
        "of its 4 eval rows: no 'rejected' response"
    )
    assert printed in capsys.readouterr().out
    again = build_stage_data(cfg_for(tmp_path, [path], data_split="0,1,0"), tok, 2)
    assert again.stats["from_cache"] and printed in capsys.readouterr().out  # printed again from the cache
    stage1 = build_stage_data(cfg_for(tmp_path, [path], data_split="1,0,0"), tok, 1)
    assert "without_rejected" not in stage1.stats["sources"][str(path)]  # stage 1 trains on every row
    assert len(stage1.train) == 36


def _mostly_sft_rows(n: int) -> list[dict]:
    """n rows of which every one but each third (rows 0, 3, 6, ...) lacks `rejected`."""
    rows = pair_rows(n)
    for i, r in enumerate(rows):
        if i % 3:
            del r["rejected"]
    return rows


def test_stage_two_stops_when_a_source_loses_most_rows_unless_skip_bad_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", _mostly_sft_rows(30))
    cfg = cfg_for(tmp_path, [path], data_split="0,1,0")  # stage 2 takes all 27 train rows + the 3 eval rows
    with pytest.raises(DataError) as e:
        build_stage_data(cfg, tok, 2)
    assert str(e.value) == (
        f"{path}: 20 of the 30 rows stage 2 takes from it (train slice + eval) have no 'rejected' response, "
        "and the reward model trains on pairs only, so it would keep 10; put SFT-only data in "
        "--sft_only_data_path, or pass --skip_bad_rows to train on the pairs anyway"
    )
    assert not list((tmp_path / "cache").glob("*.pt"))  # stopped before anything was tokenised or written
    assert (
        len(build_stage_data(cfg_for(tmp_path, [path], data_split="1,0,0"), tok, 1).train) == 27
    )  # valid SFT
    data = build_stage_data(cfg_for(tmp_path, [path], data_split="0,1,0", skip_bad_rows=True), tok, 2)
    left_out = data.stats["sources"][str(path)]["without_rejected"]
    assert (len(data.train) + len(data.eval), left_out["train"] + left_out["eval"]) == (10, 20)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "chosen": f"c{i}"} for i in range(20)])
    with pytest.raises(DataError, match=f"^{sft}: 20 of the 20 rows stage 2 takes from it"):
        build_stage_data(cfg_for(tmp_path, [sft], data_split="0,1,0"), tok, 2)
    with pytest.raises(DataError, match="stage 2 has no training rows"):
        build_stage_data(cfg_for(tmp_path, [sft], data_split="0,1,0", skip_bad_rows=True), tok, 2)


def test_every_sft_and_rm_sequence_ends_in_one_eos(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", pair_rows(20))
    for stage, keys in ((1, ["input_ids"]), (2, ["chosen_input_ids", "rejected_input_ids"])):
        data = build_stage_data(cfg_for(tmp_path, [path], data_split="1,1,1"), tok, stage)
        for ds in (data.train, data.eval):
            for i in range(len(ds)):
                for key in keys:
                    seq = ds[i][key].tolist()
                    assert seq.count(tok.eos_token_id) == 1 and seq[-1] == tok.eos_token_id


def test_bad_rows_raise_before_anything_is_written_or_are_counted(tmp_path, tok):
    rows = [json.dumps(r) for r in pair_rows(20)]
    rows[4] = json.dumps({"prompt": "p", "chosen": ""})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl line 5, column 'chosen': empty"):
        build_stage_data(cfg_for(tmp_path, [path]), tok, 1)
    assert not list((tmp_path / "cache").glob("*.pt"))
    data = build_stage_data(cfg_for(tmp_path, [path], skip_bad_rows=True), tok, 1)
    assert data.stats["sources"][str(path)]["bad_rows"] == 1
    assert "line 5" in data.stats["sources"][str(path)]["bad_row_examples"][0]


def test_overflow_counts_are_reported_in_stats(tmp_path, tok):
    rows = pair_rows(20)
    for r in rows[:10]:
        r["prompt"] = "\n\nHuman: " + "bread water salt " * 20 + "\n\nAssistant:"
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    kept = build_stage_data(cfg_for(tmp_path, [path], data_split="0,0,1", max_prompt_seq_len=16), tok, 3)
    dropped = build_stage_data(
        cfg_for(tmp_path, [path], data_split="0,0,1", max_prompt_seq_len=16, prompt_overflow="drop"), tok, 3
    )
    long_in_train = kept.stats["train"]["prompt_truncated"]
    assert long_in_train > 0 and dropped.stats["train"]["prompt_dropped"] == long_in_train
    assert len(kept.train) - len(dropped.train) == long_in_train
    assert all(len(kept.train[i]["input_ids"]) <= 16 for i in range(len(kept.train)))


def test_pad_equal_to_eos_is_refused(tmp_path):
    bad = make_tokenizer(pad=False)
    bad.pad_token = bad.eos_token
    path = write_jsonl(tmp_path / "d.jsonl", pair_rows(5))
    with pytest.raises(ValueError, match="pad_token_id == eos_token_id"):
        build_stage_data(cfg_for(tmp_path, [path]), bad, 1)


def test_bad_options_are_clear_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", pair_rows(5))
    with pytest.raises(ValueError, match="list of strings"):
        build_stage_data(DataConfig(data_path=str(path)), tok, 1)
    with pytest.raises(ValueError, match="prompt_overflow"):
        build_stage_data(cfg_for(tmp_path, [path], prompt_overflow="keep"), tok, 3)
    with pytest.raises(ValueError, match="stage"):
        build_stage_data(cfg_for(tmp_path, [path]), tok, 4)
    with pytest.raises(DataError, match="Known datasets"):
        build_stage_data(cfg_for(tmp_path, ["no/such-dataset"]), tok, 1)


def test_sft_only_hub_dataset_in_stage_two_is_refused_before_download(tmp_path, tok):
    with pytest.raises(DataError, match="sft_only_data_path"):
        build_stage_data(DataConfig(data_path=["wangrui6/Zhihu-KOL"], data_output_path=str(tmp_path)), tok, 2)


def test_extra_columns_reach_the_stage_three_prompts_and_survive_the_cache(tmp_path, tok):
    """A local file's columns beside prompt/response/chosen/rejected travel with each prompt of stage 3 (for
    a --reward_fn), through the prompt filter and the cache; stages 1 and 2 ignore them."""
    rows = pair_rows(40)
    for i, r in enumerate(rows):
        r["response"] = r["chosen"]  # DeepSpeed-Chat's column: part of the schema, not an extra
        r["answer"], r["meta"] = i, {"tags": [f"t{i}"], "ok": i % 2 == 0}
    rows[3]["prompt"] = "\n\nHuman: " + "bread water salt " * 20 + "\n\nAssistant:"  # dropped below
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = cfg_for(tmp_path, [path], data_split="0,0,1", max_prompt_seq_len=16, prompt_overflow="drop")
    for attempt in ("built", "cache"):
        data = build_stage_data(cfg, tok, 3)
        assert data.stats["from_cache"] is (attempt == "cache")
        items = [data.train[i] for i in range(len(data.train))] + [
            data.eval[i] for i in range(len(data.eval))
        ]
        assert len(items) == 39
        by_answer = {item["extra"]["answer"]: item for item in items}
        assert sorted(by_answer) == [i for i in range(40) if i != 3]  # the dropped row took its columns along
        for i, item in by_answer.items():
            assert item["extra"] == {"answer": i, "meta": {"tags": [f"t{i}"], "ok": i % 2 == 0}}
            assert f"question {i}?" in tok.decode(item["input_ids"])  # the prompt the columns came with
    batch = PromptCollator(tok.pad_token_id)([data.train[0], data.train[1]])
    assert batch["extra"] == [data.train[0]["extra"], data.train[1]["extra"]]
    assert "extra" not in build_stage_data(cfg_for(tmp_path, [path]), tok, 1).train[0]
    plain = write_jsonl(tmp_path / "plain.jsonl", pair_rows(20))
    prompts = build_stage_data(cfg_for(tmp_path, [plain], data_split="0,0,1"), tok, 3).train
    assert "extra" not in prompts[0] and "extra" not in PromptCollator(tok.pad_token_id)([prompts[0]])


def test_max_samples_keep_the_first_mixed_train_rows_and_a_seeded_sample_of_eval_rows(tmp_path, tok):
    data = tmp_path / "src"
    write_jsonl(data / "train.jsonl", pair_rows(50, "train"))
    write_jsonl(data / "test.jsonl", pair_rows(20, "test"))
    full = build_stage_data(cfg_for(tmp_path, [data]), tok, 1)
    cut = build_stage_data(cfg_for(tmp_path, [data], max_train_samples=3, max_eval_samples=4), tok, 1)
    assert not cut.stats["from_cache"]  # the limits are part of the cache key
    ids = lambda ds: [ds[i]["input_ids"].tolist() for i in range(len(ds))]  # noqa: E731
    assert ids(cut.train) == ids(full.train)[:3]
    assert len(cut.eval) == 4 and all(x in ids(full.eval) for x in ids(cut.eval))
    assert ids(cut.eval) != ids(full.eval)[:4]  # a sample across the split, not its first rows
    again = build_stage_data(cfg_for(tmp_path, [data], max_train_samples=3, max_eval_samples=4), tok, 1)
    assert again.stats["from_cache"] and ids(again.eval) == ids(cut.eval)
    with pytest.raises(ValueError, match="max_train_samples"):
        build_stage_data(cfg_for(tmp_path, [data], max_train_samples=-1), tok, 1)


def test_an_extra_column_that_is_not_json_is_refused_naming_the_line(tmp_path, tok):
    rows = [json.dumps(r) for r in pair_rows(10)]
    rows[6] = rows[6][:-1] + ', "score": NaN}'  # Python's json reads NaN; it is not a JSON value
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(
        DataError, match=r"d\.jsonl line 7, column 'score': an extra column must hold a JSON value"
    ):
        build_stage_data(cfg_for(tmp_path, [path], data_split="0,0,1"), tok, 3)
