"""A corpus of malformed dataset files through the real data layer (build_stage_data).

Every file gives a DataError naming the file, the row and the problem - never a KeyError,
UnicodeDecodeError, JSONDecodeError or pyarrow error, and never silent acceptance - or, with
skip_bad_rows, a skip that is counted in the stats and reported. A stage run as a user runs it prints the
message with no traceback and exits non-zero."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.data import DataConfig, DataError, build_stage_data
from tests.data_files import make_tokenizer, pair_rows, write_json, write_jsonl
from tests.launch import run_failing_stage, run_stage

GOOD = 20  # good rows in every file that has any


def _jsonl_with(tmp: Path, bad_line: bytes) -> Path:
    """GOOD good rows with `bad_line` as line 3."""
    lines = [json.dumps(r).encode() for r in pair_rows(GOOD)]
    lines.insert(2, bad_line)
    path = tmp / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _json_with(tmp: Path, bad_row: object) -> Path:
    """A JSON list of GOOD good rows with `bad_row` at index 2."""
    rows: list = pair_rows(GOOD)
    rows.insert(2, bad_row)
    return write_json(tmp / "data.json", rows)


def _parquet(tmp: Path, table: pa.Table) -> Path:
    path = tmp / "data.parquet"
    pq.write_table(table, path)
    return path


def _parquet_with(tmp: Path, column: str, bad_value: object, dtype: pa.DataType | None = None) -> Path:
    """GOOD + 1 rows, `column` of row index 2 replaced by `bad_value`; `column` stored as `dtype`."""
    dtype = dtype or pa.string()
    rows = pair_rows(GOOD + 1)
    columns = {name: [r[name] for r in rows] for name in ("prompt", "chosen", "rejected")}
    if dtype == pa.binary():
        columns[column] = [v.encode() for v in columns[column]]
    columns[column][2] = bad_value
    types = {name: dtype if name == column else pa.string() for name in columns}
    return _parquet(tmp, pa.table({name: pa.array(v, type=types[name]) for name, v in columns.items()}))


def _truncated_jsonl(tmp: Path) -> Path:
    path = write_jsonl(tmp / "data.jsonl", pair_rows(GOOD + 1))
    path.write_bytes(path.read_bytes()[:-25])  # the download stopped inside the last row
    return path


def _only_test_split(tmp: Path) -> Path:
    write_jsonl(tmp / "d" / "test.jsonl", pair_rows(5))
    return tmp / "d"


def _empty_test_split(tmp: Path) -> Path:
    write_jsonl(tmp / "d" / "train.jsonl", pair_rows(GOOD))
    (tmp / "d" / "test.jsonl").write_bytes(b"")
    return tmp / "d"


def _write(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(content)
        return tmp / name

    return make


@dataclass
class Case:
    make: Callable[[Path], Path]  # writes the malformed data under a folder, returns the data_path entry
    error: str  # regex of the whole message; {path} stands for the data_path entry
    skippable: bool  # with skip_bad_rows: one bad row skipped and counted, the GOOD rows kept
    skip_error: str | None = None  # when not skippable: the error with skip_bad_rows (default: `error`)
    data_split: str = "10,0,0"


def _json_list_with_bad_bytes(tmp: Path) -> Path:
    """GOOD good rows, then one whose chosen text holds the byte 0xff, in a JSON list."""
    content = json.dumps(pair_rows(GOOD)).encode()
    return _write("data.json", content[:-1] + b', {"prompt": "p", "chosen": "\xff"}]')(tmp)


ROW_HINT = r" \(--skip_bad_rows skips and counts such rows\)"
NO_ROWS = r"{path}: no usable rows \(empty file, or every row was bad\)"
CORPUS = {
    "truncated JSON Lines file": Case(
        _truncated_jsonl,
        r"{path} line 21: invalid JSON \(Unterminated string starting at: column \d+\)" + ROW_HINT,
        True,
    ),
    "truncated JSON list file": Case(
        _write("data.json", json.dumps(pair_rows(GOOD)).encode()[:-30]),
        r"{path}: invalid JSON \(Unterminated string starting at: line 1 column \d+\)",
        False,
    ),
    "prompt is a number": Case(
        lambda t: _jsonl_with(t, b'{"prompt": 42, "chosen": " ok"}'),
        r"{path} line 3, column 'prompt': expected a string, got int" + ROW_HINT,
        True,
    ),
    "prompt is a list": Case(
        lambda t: _json_with(t, {"prompt": ["a", "b"], "chosen": " ok"}),
        r"{path} row index 2, column 'prompt': expected a string, got list" + ROW_HINT,
        True,
    ),
    "row is not an object": Case(
        lambda t: _jsonl_with(t, b'"just a string"'),
        r"{path} line 3: expected an object with prompt/chosen/rejected, got str" + ROW_HINT,
        True,
    ),
    "chosen is null (parquet)": Case(
        lambda t: _parquet_with(t, "chosen", None),
        r"{path} row index 2, column 'chosen': null \(no text\)" + ROW_HINT,
        True,
    ),
    "huge prompt (5 MB)": Case(
        lambda t: _jsonl_with(t, json.dumps({"prompt": "x " * 2_500_000, "chosen": " ok"}).encode()),
        r"{path} line 3, column 'prompt': text of 5,000,000 characters, more than the 1,000,000 allowed"
        + ROW_HINT,
        True,
    ),
    "non-UTF-8 bytes (JSON Lines)": Case(
        lambda t: _jsonl_with(t, b'{"prompt": "caf\xe9?", "chosen": " ok"}'),
        r"{path} line 3: not valid UTF-8 \(byte 0xe9 at byte offset 15 of the line\)" + ROW_HINT,
        True,
    ),
    "non-UTF-8 bytes (JSON list)": Case(
        _json_list_with_bad_bytes,
        r"{path} row index 20, column 'chosen': not valid UTF-8 \(undecodable bytes in the text\)" + ROW_HINT,
        True,
    ),
    "non-UTF-8 bytes (parquet binary column)": Case(
        lambda t: _parquet_with(t, "prompt", b"caf\xe9", pa.binary()),
        r"{path} row index 2, column 'prompt': not valid UTF-8 \(unexpected end of data at byte 3\)"
        + ROW_HINT,
        True,
    ),
    "empty JSON Lines file": Case(_write("data.jsonl", b""), NO_ROWS, False),
    "empty JSON file": Case(_write("data.json", b"\n"), NO_ROWS, False),
    "empty parquet file": Case(_write("data.parquet", b""), r"{path}: cannot read as parquet \(.+\)", False),
    "corrupt parquet file": Case(
        _write("data.parquet", b"PAR1 not really"), r"{path}: cannot read as parquet \(.+\)", False
    ),
    "missing column": Case(
        lambda t: _jsonl_with(t, b'{"prompt": "p", "rejected": " no"}'),
        r"{path} line 3, column 'chosen': missing column" + ROW_HINT,
        True,
    ),
    "parquet without the chosen column": Case(
        lambda t: _parquet(t, pa.table({"prompt": ["a", "b"], "response": ["c", "d"]})),
        r"{path} row index 0, column 'chosen': missing column" + ROW_HINT,
        False,
        skip_error=NO_ROWS,  # every row is bad
    ),
    "directory without a train split": Case(
        _only_test_split,
        r"{path}: no train file \(train.jsonl, train.json, train\*.parquet\) in it .*",
        False,
    ),
    "empty test split file": Case(_empty_test_split, NO_ROWS.replace("{path}", "{path}/test.jsonl"), False),
    "data_split leaving stage 1 nothing": Case(
        lambda t: write_jsonl(t / "data.jsonl", pair_rows(GOOD)),
        r"stage 1 has no training rows: its data_split '0,1,1' slice of \['{path}'\] is empty",
        False,
        data_split="0,1,1",
    ),
    "unsupported file type": Case(
        _write("data.csv", b"prompt,chosen\na,b\n"),
        r"{path}: unsupported file type '.csv'; use .jsonl, .json or .parquet",
        False,
    ),
}


def _build(path: Path, case: Case, tmp: Path, skip: bool):
    cfg = DataConfig(
        data_path=[str(path)],
        data_split=case.data_split,
        data_output_path=str(tmp / "cache"),
        skip_bad_rows=skip,
    )
    return build_stage_data(cfg, make_tokenizer(), stage=1)


@pytest.mark.parametrize("kind", list(CORPUS))
def test_malformed_file_is_a_clear_error_or_a_counted_skip(kind, tmp_path, capsys):
    case = CORPUS[kind]
    (tmp_path / "src").mkdir()
    path = case.make(tmp_path / "src")
    pattern = case.error.replace("{path}", re.escape(str(path)))
    with pytest.raises(DataError) as e:
        _build(path, case, tmp_path, skip=False)
    assert type(e.value) is DataError  # not a KeyError, UnicodeDecodeError, JSONDecodeError, ArrowInvalid...
    assert re.fullmatch(pattern, str(e.value)), str(e.value)
    if not case.skippable:
        skip_pattern = (case.skip_error or case.error).replace("{path}", re.escape(str(path)))
        with pytest.raises(DataError) as e:
            _build(path, case, tmp_path, skip=True)
        assert re.fullmatch(skip_pattern, str(e.value)), str(e.value)
        return
    data = _build(path, case, tmp_path, skip=True)
    source = data.stats["sources"][str(path)]
    assert source["bad_rows"] == 1
    assert re.fullmatch(pattern.removesuffix(ROW_HINT), source["bad_row_examples"][0])
    assert len(data.train) + len(data.eval) == GOOD  # every good row kept, the bad one left out
    assert f"[data] {path}: skipped 1 bad rows; first reasons:" in capsys.readouterr().out


@pytest.mark.slow
def test_stage_run_prints_the_data_error_without_a_traceback(tiny_dir, tmp_path):
    """`python step1_sft/main.py` on a file with a bad row: exit status 1, the message on stderr, no traceback,
    nothing tokenised, trained or saved."""
    (tmp_path / "src").mkdir()
    path = CORPUS["prompt is a number"].make(tmp_path / "src")
    argv = [
        "--model_name_or_path",
        str(tiny_dir),
        "--data_path",
        str(path),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    proc = run_failing_stage("step1_sft/main.py", [*argv, "--data_output_path", str(tmp_path / "cache")])
    assert proc.returncode == 1
    expected = (
        f"data error: {path} line 3, column 'prompt': expected a string, got int (--skip_bad_rows skips"
    )
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not list((tmp_path / "cache").glob("*.pt"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ------------------------------------------------------------------- stage 2: rows without a rejected response


def _rows_without_rejected(tmp: Path, n: int, without: list[int]) -> Path:
    """n pair rows in a train.jsonl, the rows at indices `without` with no `rejected` (valid rows for stage 1,
    which trains on prompt + chosen; stage 2 cannot use them)."""
    rows = pair_rows(n)
    for i in without:
        del rows[i]["rejected"]
    return write_jsonl(tmp / "d" / "train.jsonl", rows)


def _stage2_argv(tiny_dir: Path, data: Path, tmp: Path) -> list[str]:
    return [
        "--model_name_or_path", str(tiny_dir), "--data_path", str(data.parent), "--data_split", "0,1,0",
        "--output_dir", str(tmp / "out"), "--data_output_path", str(tmp / "cache"), "--max_seq_len", "64",
        "--per_device_train_batch_size", "4", "--eval_iters", "1", "--normalization_sample", "none",
    ]  # fmt: skip


@pytest.mark.slow
def test_stage2_stops_on_a_file_whose_rows_mostly_lack_rejected(tiny_dir, tmp_path):
    """`python step2_reward/main.py` on a file where 2 rows of 3 have no `rejected`: the message names the
    file, how many of how many rows, and the flag; no traceback, nothing tokenised, trained or saved."""
    data = _rows_without_rejected(tmp_path, 24, [i for i in range(24) if i % 3])  # 16 of 24
    proc = run_failing_stage("step2_reward/main.py", _stage2_argv(tiny_dir, data, tmp_path))
    assert proc.returncode == 1
    expected = (
        f"data error: {data.parent}: 16 of the 24 rows stage 2 takes from it (train slice + eval) have no "
        "'rejected' response, and the reward model trains on pairs only, so it would keep 8; put SFT-only data "
        "in --sft_only_data_path, or pass --skip_bad_rows to train on the pairs anyway"
    )
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not list((tmp_path / "cache").glob("*.pt"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_stage2_trains_on_a_file_losing_a_minority_of_rows_and_logs_the_count(tiny_dir, tmp_path):
    """A third of the rows lack `rejected`: stage 2 trains on the pairs and prints how many rows it left out
    of its train slice and eval split, and why."""
    data = _rows_without_rejected(tmp_path, 30, list(range(0, 30, 3)))  # 10 of 30
    out = run_stage("step2_reward/main.py", _stage2_argv(tiny_dir, data, tmp_path), num_procs=1)
    printed = re.search(
        rf"\[data\] {re.escape(str(data.parent))}: stage 2 left out (\d+) of its 27 train rows and (\d+) of its "
        r"3 eval rows: no 'rejected' response \(the reward model trains on pairs only\)",
        out,
    )
    assert printed, out[-3000:]
    train_out, eval_out = int(printed[1]), int(printed[2])
    assert train_out + eval_out == 10
    assert f"'rows_in': {27 - train_out}," in out  # the tokenizer's count of the train rows it was given
    metrics = json.loads((tmp_path / "out" / "rm_metrics.json").read_text())
    assert metrics["final"]["pairs"] == 3 - eval_out
