"""PPO-ptx blocks, and the once-per-node cache protocol seen from a non-zero local rank."""

from __future__ import annotations

import pytest
import torch

from common import dist
from common.data import DataError, load_unsupervised
from common.data.cache import build_once_per_node
from tests.data_files import encode, make_tokenizer, write_json, write_jsonl, write_parquet

DOCS = ["How do I bake bread?", "", "Paris is the capital of France.", "Mix flour, water and salt."]


@pytest.fixture
def tok():
    return make_tokenizer()


def expected_stream(tok, docs: list[str]) -> list[int]:
    stream: list[int] = []
    for doc in [d for d in docs if d.strip()]:
        if stream:
            stream.append(tok.eos_token_id)
        stream += encode(tok, doc)
    return stream


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "txt"])
def test_blocks_are_the_eos_joined_stream_cut_into_block_size(tmp_path, tok, fmt):
    records = [{"text": d, "meta": 1} for d in DOCS]
    if fmt == "txt":
        path = tmp_path / "corpus.txt"
        path.write_text("\n".join(DOCS) + "\n")
    else:
        path = {"jsonl": write_jsonl, "json": write_json, "parquet": write_parquet}[fmt](
            tmp_path / f"c.{fmt}", records
        )
    block = 7
    data = load_unsupervised(str(path), None, tok, block)
    stream = expected_stream(tok, DOCS)
    n_blocks = len(stream) // block
    assert len(data) == n_blocks > 1
    assert torch.cat([data[i]["input_ids"] for i in range(len(data))]).tolist() == stream[: n_blocks * block]
    assert data.stats["tail_tokens_dropped"] == len(stream) % block
    assert data.stats["empty_documents_skipped"] == 1 and data.stats["documents"] == 3
    item = data[0]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (block,)
    assert torch.equal(item["labels"], item["input_ids"]) and bool(item["attention_mask"].all())
    assert stream.count(tok.eos_token_id) == 2  # between the three non-empty documents only


def test_bad_unsupervised_rows_name_file_and_row(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a b c"}, {"body": "no text"}])
    with pytest.raises(DataError, match=r"c\.jsonl line 2, column 'text': missing column"):
        load_unsupervised(str(path), None, tok, 4)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match=r"d\.jsonl line 1, column 'text': expected a string"):
        load_unsupervised(str(path), None, tok, 4)
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": "short"}])
    with pytest.raises(DataError, match="fewer than one block"):
        load_unsupervised(str(path), None, tok, 1000)


def test_unsupervised_cache_follows_file_content(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    first = load_unsupervised(str(path), None, tok, 4, cache_dir=str(tmp_path / "cache"))
    again = load_unsupervised(str(path), None, tok, 4, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(first.blocks, again.blocks)
    write_jsonl(path, [{"text": d} for d in reversed(DOCS)])
    changed = load_unsupervised(str(path), None, tok, 4, cache_dir=str(tmp_path / "cache"))
    fresh = load_unsupervised(str(path), None, tok, 4)
    assert torch.equal(changed.blocks, fresh.blocks) and not torch.equal(changed.blocks, first.blocks)


def test_non_zero_local_rank_loads_what_rank_zero_built_and_reports_its_error(tmp_path, monkeypatch):
    barriers = []
    monkeypatch.setattr(dist, "barrier", lambda: barriers.append(1))
    blob = {"x": torch.arange(3)}
    built, built_now = build_once_per_node(tmp_path, "p", lambda: "k1", lambda: blob)  # local rank 0
    assert built_now and torch.equal(built["x"], blob["x"]) and barriers == [1]

    monkeypatch.setattr(dist, "get_local_rank", lambda: 1)

    def must_not_build():
        raise AssertionError("a non-zero local rank built")

    loaded, built_now = build_once_per_node(tmp_path, "p", lambda: "k1", must_not_build)
    assert not built_now and torch.equal(loaded["x"], blob["x"]) and barriers == [1, 1]
    with pytest.raises(DataError, match="missing after local rank 0 built it"):
        build_once_per_node(tmp_path, "p", lambda: "k2", must_not_build)

    (tmp_path / "p.build_error.txt").write_text("DataError: x.jsonl line 3: invalid JSON")
    with pytest.raises(DataError, match="local rank 0 failed to build the data: DataError: x.jsonl line 3"):
        build_once_per_node(tmp_path, "p", lambda: "k1", must_not_build)


def test_rank_zero_failure_is_written_for_the_other_ranks(tmp_path, monkeypatch):
    barriers = []
    monkeypatch.setattr(dist, "barrier", lambda: barriers.append(1))

    def fail():
        raise DataError("bad.jsonl line 2: invalid JSON")

    with pytest.raises(DataError, match="bad.jsonl"):
        build_once_per_node(tmp_path, "p", lambda: "k", fail)
    assert barriers == [1]  # it still reached the barrier, so the others do not hang
    assert "bad.jsonl line 2" in (tmp_path / "p.build_error.txt").read_text()
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.tmp"))
