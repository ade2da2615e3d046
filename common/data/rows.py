"""The row every source is mapped to, the errors bad rows raise, and the tally of skipped rows.

A `Row` is one example in the pipeline's schema: a prompt in the "\\n\\nHuman: ...\\n\\nAssistant:"
convention, the chosen response, and the rejected response (None for SFT-only sources). An unpaired row
(KTO's data: `prompt`, `completion`, `label`) holds its completion as `chosen` and its label (true:
desirable) as `label`; the other rows have label None. Every row remembers where it came from (`origin`,
e.g. "data/train.jsonl line 7") so that any later error can name the file and the row.

Validation rules (`make_row`), applied to every source before anything is split or tokenized:
- `prompt` and `chosen` must be present, strings, and not empty or whitespace-only;
- `rejected` is optional (absent or null -> None); when given it obeys the same rules and must differ from
  `chosen` (compared after stripping surrounding whitespace);
- an unpaired row has `prompt`, `completion` (the same rules as `chosen`) and `label`, a JSON boolean, and
  neither `chosen` nor `rejected`;
- strings must be valid UTF-8 (readers turn undecodable bytes into lone surrogates, caught here);
- no text is longer than MAX_TEXT_CHARS characters;
- extra columns must be JSON values (strings, numbers, booleans, null, lists and objects of them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from common.dist import print_rank0
from common.errors import UserError

MAX_EXAMPLES = 5  # how many reasons for skipped rows are kept for the report
# Longest text accepted in one column. Far beyond any sequence length a stage trains on (it would keep only
# the end of such a prompt, or drop such a response), so a longer text is a broken row - e.g. a whole file
# pasted into one field - and tokenizing it would take seconds per megabyte for nothing.
MAX_TEXT_CHARS = 1_000_000


class DataError(UserError, ValueError):
    """Bad input data: the message names the file (or dataset), the row, the column and the problem."""

    prefix = "data error"


class RowError(Exception):
    """Raised while checking one row; the caller, who knows the row's origin, turns it into a DataError."""

    def __init__(self, column: str | None, problem: str):
        super().__init__(problem)
        self.column = column
        self.problem = problem


class RowFiltered(Exception):
    """A row that a hub adapter leaves out by design (e.g. a comparison with tied scores); always counted."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# "response": DeepSpeed-Chat's name of chosen; "completion" and "label": an unpaired row's (KTO)
SCHEMA_COLUMNS = ("prompt", "response", "chosen", "rejected", "completion", "label")


@dataclass(frozen=True)
class Row:
    prompt: str
    chosen: str
    rejected: str | None
    origin: str
    extra: str = ""  # the record's other columns as a JSON object, "" when it has none
    label: bool | None = None  # an unpaired row's label (True: desirable; chosen holds its completion)


@dataclass
class RowTally:
    """Counts of rows left out of one source: bad rows skipped (skip_bad_rows=True) and filtered rows."""

    source: str
    skip_bad_rows: bool
    bad: int = 0
    examples: list[str] = field(default_factory=list)
    filtered: dict[str, int] = field(default_factory=dict)

    def bad_row(self, origin: str, column: str | None, problem: str) -> None:
        """Raise a DataError for a bad row, or count it when skipping bad rows."""
        where = origin if column is None else f"{origin}, column {column!r}"
        message = f"{where}: {problem}"
        if not self.skip_bad_rows:
            raise DataError(message + " (--skip_bad_rows skips and counts such rows)")
        self.bad += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(message)

    def filter_row(self, reason: str) -> None:
        self.filtered[reason] = self.filtered.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "bad_rows": self.bad,
            "bad_row_examples": list(self.examples),
            "filtered": dict(self.filtered),
        }

    def report(self) -> None:
        """Print what was left out on rank 0; silent only when nothing was."""
        if self.bad:
            print_rank0(f"[data] {self.source}: skipped {self.bad} bad rows; first reasons:")
            for example in self.examples:
                print_rank0(f"[data]   {example}")
        for reason, count in self.filtered.items():
            print_rank0(f"[data] {self.source}: left out {count} rows ({reason})")


def has_undecodable_bytes(text: str) -> bool:
    """Whether `text` holds lone surrogates: bytes that were not valid UTF-8 (read with errors="surrogateescape")
    or a JSON "\\udXXX" escape of half a character. Either cannot be encoded back to UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_text(value: Any, column: str) -> str:
    """Return `value` if it is a usable text, else raise RowError naming `column`."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowError(column, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if value is None:
        raise RowError(column, "null (no text)")
    if not isinstance(value, str):
        raise RowError(column, f"expected a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise RowError(column, f"text of {len(value):,} characters, more than the {MAX_TEXT_CHARS:,} allowed")
    if not value.strip():
        raise RowError(column, "empty or whitespace-only text")
    if has_undecodable_bytes(value):
        raise RowError(column, "not valid UTF-8 (undecodable bytes in the text)")
    return value


def make_row(record: Any, origin: str) -> Row:
    """Validate one record in the prompt/chosen/rejected schema, or the unpaired prompt/completion/label one
    -> Row; its other columns are kept as JSON."""
    if not isinstance(record, dict):
        raise RowError(None, f"expected an object with prompt/chosen/rejected, got {type(record).__name__}")
    if "completion" in record or "label" in record:
        return _unpaired_row(record, origin)
    for column in ("prompt", "chosen"):
        if column not in record:
            raise RowError(column, "missing column")
    prompt = check_text(record["prompt"], "prompt")
    chosen = check_text(record["chosen"], "chosen")
    rejected = record.get("rejected")
    if rejected is not None:
        rejected = check_text(rejected, "rejected")
        if rejected.strip() == chosen.strip():
            raise RowError("rejected", "chosen and rejected are the same text")
    return Row(prompt, chosen, rejected, origin, extra_columns(record))


def _unpaired_row(record: dict[str, Any], origin: str) -> Row:
    both = [c for c in ("chosen", "rejected") if c in record]
    if both:
        raise RowError(
            both[0], "a row is a pair (chosen, rejected) or an unpaired completion with a label, not both"
        )
    for column in ("prompt", "completion", "label"):
        if column not in record:
            raise RowError(column, "missing column (an unpaired row has prompt, completion and label)")
    label = record["label"]
    if not isinstance(label, bool):
        raise RowError("label", f"expected true or false (desirable or not), got {label!r}")
    prompt = check_text(record["prompt"], "prompt")
    completion = check_text(record["completion"], "completion")
    return Row(prompt, completion, None, origin, extra_columns(record), label)


def extra_columns(record: dict[str, Any]) -> str:
    """The record's columns other than prompt/chosen/rejected as one JSON object ("" when there are none);
    RowError naming a column whose value is not a JSON value."""
    extra = {k: v for k, v in record.items() if k not in SCHEMA_COLUMNS}
    if not extra:
        return ""
    for column, value in extra.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise RowError(column, f"an extra column must hold a JSON value ({e})") from None
    return json.dumps(extra, sort_keys=True)
