"""Local sources: formats, directories, source resolution, and bad-row errors that name file, row, column."""

from __future__ import annotations

import json

import pytest

from common.data.rows import DataError
from common.data.sources import HubSource, LocalSource, open_source
from tests.data_files import pair_rows, write_json, write_jsonl, write_parquet


def test_jsonl_json_and_parquet_give_the_same_rows(tmp_path):
    rows = pair_rows(4)
    rows[3].pop("rejected")  # SFT-only row: rejected absent -> None
    rows[2]["rejected"] = None
    rows[0]["response"] = "extra columns are ignored"
    paths = [
        write_jsonl(tmp_path / "a.jsonl", rows),
        write_json(tmp_path / "b.json", rows),
        write_parquet(tmp_path / "c.parquet", rows),
    ]
    for path in paths:
        read = LocalSource(str(path)).read(skip_bad_rows=False)
        assert read.eval is None
        assert [(r.prompt, r.chosen, r.rejected) for r in read.train] == [
            (r["prompt"], r["chosen"], r.get("rejected")) for r in rows
        ]
    jsonl_rows = LocalSource(str(paths[0])).read(False).train
    assert jsonl_rows[1].origin == f"{paths[0]} line 2"


def test_json_file_in_json_lines_layout_is_read(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", pair_rows(3))
    assert len(LocalSource(str(path)).read(False).train) == 3


def test_directory_with_train_and_test_files(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", pair_rows(5, "tr"))
    write_parquet(tmp_path / "d" / "data" / "test-00000-of-00001.parquet", pair_rows(2, "te"))
    (tmp_path / "d" / "README.md").write_text("not data")
    read = LocalSource(str(tmp_path / "d")).read(False)
    assert [r.prompt for r in read.train] == [r["prompt"] for r in pair_rows(5, "tr")]
    assert [r.prompt for r in read.eval] == [r["prompt"] for r in pair_rows(2, "te")]


def test_directory_with_unclassifiable_or_missing_train_file_is_an_error(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", pair_rows(2))
    write_jsonl(tmp_path / "d" / "extra.jsonl", pair_rows(2))
    with pytest.raises(DataError, match="extra.jsonl"):
        LocalSource(str(tmp_path / "d"))
    write_jsonl(tmp_path / "e" / "test.jsonl", pair_rows(2))
    with pytest.raises(DataError, match="no train file"):
        LocalSource(str(tmp_path / "e"))


def test_open_source_resolution(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", pair_rows(1))
    assert isinstance(open_source(str(path)), LocalSource)
    assert isinstance(open_source("Dahoas/rm-static"), HubSource)  # nothing is loaded until needed
    with pytest.raises(DataError) as e:
        open_source("Dahoas/rm-statik")
    assert "Dahoas/rm-statik" in str(e.value) and "Dahoas/rm-static" in str(e.value)
    assert "Anthropic/hh-rlhf" in str(e.value)


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match="empty.jsonl: no usable rows"):
        LocalSource(str(path)).read(False)


def test_empty_json_list_is_an_error(tmp_path):
    path = write_json(tmp_path / "empty.json", [])
    with pytest.raises(DataError, match="no usable rows"):
        LocalSource(str(path)).read(False)


def _jsonl_with_bad_line(tmp_path, bad_line: bytes):
    good = [json.dumps(r).encode() for r in pair_rows(3)]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join([good[0], good[1], bad_line, good[2]]) + b"\n")
    return path


BAD_LINES = {
    "missing column": (json.dumps({"prompt": "p", "rejected": "r"}).encode(), "'chosen': missing column"),
    "wrong type": (json.dumps({"prompt": "p", "chosen": 3}).encode(), "'chosen': expected a string, got int"),
    "empty text": (
        json.dumps({"prompt": "  \n", "chosen": "c"}).encode(),
        "'prompt': empty or whitespace-only",
    ),
    "invalid json": (b'{"prompt": "p", "chosen": ', "invalid JSON"),
    "non-utf8": (b'{"prompt": "caf\xe9", "chosen": "c"}', "not valid UTF-8"),
    "chosen == rejected": (
        json.dumps({"prompt": "p", "chosen": " same", "rejected": "same "}).encode(),
        "'rejected': chosen and rejected are the same text",
    ),
    "not an object": (b"[1, 2]", "expected an object"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_jsonl_row_names_file_line_and_column(tmp_path, kind):
    bad_line, message = BAD_LINES[kind]
    path = _jsonl_with_bad_line(tmp_path, bad_line)
    with pytest.raises(DataError) as e:
        LocalSource(str(path)).read(skip_bad_rows=False)
    assert f"{path} line 3" in str(e.value)
    assert message in str(e.value)


def test_skip_bad_rows_counts_every_kind(tmp_path):
    good = [json.dumps(r).encode() for r in pair_rows(2)]
    bad = [line for line, _ in BAD_LINES.values()]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(good[:1] + bad + good[1:]) + b"\n")
    read = LocalSource(str(path)).read(skip_bad_rows=True)
    assert len(read.train) == 2
    stats = read.tally.as_dict()
    assert stats["bad_rows"] == len(BAD_LINES)
    assert len(stats["bad_row_examples"]) == 5  # the first reasons are kept, not all
    assert stats["bad_row_examples"][0].startswith(f"{path} line 2")


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "allbad.jsonl", [{"prompt": "p"}, {"prompt": "q"}])
    with pytest.raises(DataError, match="no usable rows"):
        LocalSource(str(path)).read(skip_bad_rows=True)


def test_bad_row_in_json_list_names_its_index(tmp_path):
    rows = pair_rows(3)
    rows[1]["chosen"] = ["not", "a", "string"]
    path = write_json(tmp_path / "x.json", rows)
    with pytest.raises(DataError, match=r"x\.json row index 1, column 'chosen': expected a string, got list"):
        LocalSource(str(path)).read(False)


def test_non_utf8_in_json_list_names_its_index(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'[{"prompt": "p", "chosen": "c"}, {"prompt": "p", "chosen": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"x\.json row index 1, column 'chosen': not valid UTF-8"):
        LocalSource(str(path)).read(False)


def test_invalid_json_list_file_names_the_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[{"prompt": "p", "chosen": "c"},\n {"prompt": ]')
    with pytest.raises(DataError, match=r"x\.json: invalid JSON .* line 2"):
        LocalSource(str(path)).read(False)


def test_bad_row_in_parquet_names_its_index(tmp_path):
    rows = pair_rows(3)
    rows[2]["prompt"] = ""
    path = write_parquet(tmp_path / "x.parquet", rows)
    with pytest.raises(DataError, match=r"x\.parquet row index 2, column 'prompt': empty"):
        LocalSource(str(path)).read(False)


def test_local_fingerprint_follows_content_not_name(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", pair_rows(2))
    before = LocalSource(str(path)).fingerprint()
    assert LocalSource(str(path)).fingerprint() == before
    write_jsonl(path, pair_rows(2, "changed"))
    assert LocalSource(str(path)).fingerprint() != before
