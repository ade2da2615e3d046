"""Per-stage tokenization into token-id lists, with EOS appended as an id and over-long rows counted.

Texts are encoded with `tokenizer(texts, add_special_tokens=False, split_special_tokens=True)`: prompt and
response separately, then concatenated, so the prompt/response boundary is exact. No BOS is added (for
tokenizers whose models expect one, such as Llama, the sequence simply starts without it). Because
`split_special_tokens=True`, a text that contains "</s>" or "<|endoftext|>" is tokenized as plain
characters: the only EOS id in a sequence is the one appended here.

- SFT (stage 1): prompt + chosen + [eos]; `prompt_len` is kept so the dataset can mask the prompt.
- RM (stage 2): prompt + chosen + [eos] and prompt + rejected + [eos].
- KTO (stage 2, unpaired): prompt + completion + [eos] and its label, one sequence per row.
- Over-long SFT/RM rows (> max_seq_len): the response and its EOS are kept and the prompt is cut from the
  left (its end, which holds "Assistant:", survives). A row whose response + EOS leaves no room for at
  least one prompt token is dropped. Both cases are counted.
- PPO (stage 3): prompt ids only, at most max_prompt_seq_len; longer prompts are cut from the left
  (`prompt_overflow="truncate_left"`) or dropped ("drop"), and counted.

With a ChatFormat (`--apply_chat_template`, `common.data.chat_format`) each prompt is rendered by the model's chat
template (ending in its generation prompt) and encoded with the template's special tokens as special ids;
a row whose own text contains a special-token string is a DataError, so the only special ids in a
sequence are the template's and the appended EOS (its end-of-turn token). Responses are the assistant
content, stripped. Stage 3 then also keeps each prompt's original text ("prompt_text"), which reward
functions and the gold scorer read instead of the rendering.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from common.data.chat_format import ChatFormat, ChatTemplateError
from common.data.rows import DataError, Row

PROMPT_OVERFLOW_POLICIES = ("truncate_left", "drop")
_BATCH = 1024  # texts per tokenizer call


def check_tokenizer(tokenizer: Any) -> None:
    """Raise unless the tokenizer has an EOS id and a pad id distinct from it (docs/ppo-fidelity.md item 1)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        raise ValueError("tokenizer.eos_token_id is None: every SFT target and RM sequence must end in EOS")
    if pad is None:
        raise ValueError("tokenizer.pad_token_id is None: set a pad token that is not the EOS token")
    if pad == eos:
        raise ValueError(
            f"tokenizer.pad_token_id == eos_token_id == {eos}: padding masks would erase the real EOS; "
            "add a dedicated pad token (docs/ppo-fidelity.md item 1)"
        )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over what decides the token ids: the backend definition (vocab, merges, normaliser...) and the
    special tokens. Falls back to the vocabulary for tokenizers without a `tokenizers` backend. Independent of
    the truncation/padding settings a previous call left on the backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        # Per-call state that the last `tokenizer(..., padding=, truncation=)` left behind: leaving it in would
        # give ranks that tokenized different things different keys.
        definition.pop("truncation", None)
        definition.pop("padding", None)
        definition = json.dumps(definition, sort_keys=True)
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {
        "class": type(tokenizer).__name__,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    return hashlib.sha256((definition + json.dumps(special, sort_keys=True)).encode()).hexdigest()


def encode_texts(tokenizer: Any, texts: Sequence[str], split_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text, no special tokens added; special-token strings are plain text unless
    `split_special_tokens` is False (rendered chat templates)."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), _BATCH):
        batch = list(texts[start : start + _BATCH])
        ids.extend(
            tokenizer(batch, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]
        )
    return ids


def encode_prompts(rows: Sequence[Row], tokenizer: Any, fmt: ChatFormat | None) -> list[list[int]]:
    """Prompt ids of each row: its text as is, or rendered by the chat template when `fmt` is given."""
    if fmt is None:
        ids = encode_texts(tokenizer, [r.prompt for r in rows])
        _check_no_special(ids, rows, "prompt", tokenizer)
        return ids
    specials = [t for t in tokenizer.all_special_tokens if t]
    texts = []
    for row in rows:
        for column in ("prompt", "chosen", "rejected"):
            text = getattr(row, column) or ""
            found = next((t for t in specials if t in text), None)
            if found is not None:
                raise DataError(
                    f"{row.origin}, column {column!r}: contains the special token {found!r}, which the chat "
                    "template uses; remove it or train without --apply_chat_template"
                )
        try:
            texts.append(fmt.prompt(row.prompt))
        except ChatTemplateError as e:
            raise DataError(f"{row.origin}, column 'prompt': {e}") from None
    return encode_texts(tokenizer, texts, split_special_tokens=False)


def encode_responses(
    rows: Sequence[Row], column: str, tokenizer: Any, fmt: ChatFormat | None
) -> list[list[int]]:
    """Ids of each row's `column` response (without EOS): as is, or its stripped content with `fmt`."""
    texts = [getattr(r, column) for r in rows]
    ids = encode_texts(tokenizer, texts if fmt is None else [fmt.response(t) for t in texts])
    _check_no_special(ids, rows, column, tokenizer)
    return ids


def _check_no_special(ids: list[list[int]], rows: Sequence[Row], column: str, tokenizer: Any) -> None:
    # split_special_tokens should make this impossible; guard against tokenizers that ignore the flag.
    special = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for seq, row in zip(ids, rows, strict=True):
        if not special.isdisjoint(seq):
            raise DataError(f"{row.origin}, column {column!r}: the text tokenizes to the EOS or pad id")


def fit_to_length(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], int] | None:
    """prompt + response cut to max_len by dropping prompt tokens from the left.

    Returns (ids, prompt_len), or None when response alone leaves no room for a single prompt token.
    """
    if len(response) >= max_len:
        return None
    prompt = prompt[max(0, len(prompt) + len(response) - max_len) :]
    return prompt + response, len(prompt)


def tokenize_sft(
    rows: Sequence[Row], tokenizer: Any, max_seq_len: int, fmt: ChatFormat | None = None
) -> tuple[dict[str, list], dict]:
    """SFT rows -> {"input_ids": [prompt + chosen + [eos]], "prompt_len": [int]}, plus counts."""
    out, counts, _ = _prompt_and_response(rows, tokenizer, max_seq_len, fmt)
    return out, counts


def tokenize_unpaired(
    rows: Sequence[Row], tokenizer: Any, max_seq_len: int, fmt: ChatFormat | None = None
) -> tuple[dict[str, list], dict]:
    """Unpaired rows (KTO; the completion in `chosen`) -> {"input_ids": [prompt + completion + [eos]],
    "prompt_len": [int], "desirable": [bool]}, plus counts (an over-long row is cut or dropped as in SFT)."""
    out, counts, kept = _prompt_and_response(rows, tokenizer, max_seq_len, fmt)
    out["desirable"] = [bool(rows[i].label) for i in kept]
    return out, counts


def _prompt_and_response(
    rows: Sequence[Row], tokenizer: Any, max_seq_len: int, fmt: ChatFormat | None
) -> tuple[dict[str, list], dict, list[int]]:
    """prompt + chosen + [eos] of each row that fits (fit_to_length), its prompt length, the counts, and the
    indices of the rows kept."""
    eos = tokenizer.eos_token_id
    prompts = encode_prompts(rows, tokenizer, fmt)
    chosens = encode_responses(rows, "chosen", tokenizer, fmt)
    out: dict[str, list] = {"input_ids": [], "prompt_len": []}
    counts = {"rows_in": len(rows), "prompt_truncated": 0, "dropped_too_long": 0}
    kept = []
    for i, (prompt, chosen) in enumerate(zip(prompts, chosens, strict=True)):
        fitted = fit_to_length(prompt, chosen + [eos], max_seq_len)
        if fitted is None:
            counts["dropped_too_long"] += 1
            continue
        ids, prompt_len = fitted
        counts["prompt_truncated"] += prompt_len < len(prompt)
        out["input_ids"].append(ids)
        out["prompt_len"].append(prompt_len)
        kept.append(i)
    counts["rows_out"] = len(out["input_ids"])
    return out, counts, kept


def tokenize_pairs(
    rows: Sequence[Row], tokenizer: Any, max_seq_len: int, fmt: ChatFormat | None = None
) -> tuple[dict[str, list], dict]:
    """Pair rows -> {"chosen": [prompt + chosen + [eos]], "rejected": [prompt + rejected + [eos]],
    "chosen_prompt_len": [int], "rejected_prompt_len": [int]} (the prompt tokens each side kept, for DPO's
    response mask), plus counts.

    A pair is dropped when either side is too long; it counts once."""
    eos = tokenizer.eos_token_id
    prompts = encode_prompts(rows, tokenizer, fmt)
    chosens = encode_responses(rows, "chosen", tokenizer, fmt)
    rejecteds = encode_responses(rows, "rejected", tokenizer, fmt)
    out: dict[str, list] = {"chosen": [], "rejected": [], "chosen_prompt_len": [], "rejected_prompt_len": []}
    counts = {"rows_in": len(rows), "prompt_truncated": 0, "dropped_too_long": 0}
    for prompt, chosen, rejected in zip(prompts, chosens, rejecteds, strict=True):
        fitted_c = fit_to_length(prompt, chosen + [eos], max_seq_len)
        fitted_r = fit_to_length(prompt, rejected + [eos], max_seq_len)
        if fitted_c is None or fitted_r is None:
            counts["dropped_too_long"] += 1
            continue
        counts["prompt_truncated"] += min(fitted_c[1], fitted_r[1]) < len(prompt)
        out["chosen"].append(fitted_c[0])
        out["rejected"].append(fitted_r[0])
        out["chosen_prompt_len"].append(fitted_c[1])
        out["rejected_prompt_len"].append(fitted_r[1])
    counts["rows_out"] = len(out["chosen"])
    return out, counts


def tokenize_prompts(
    rows: Sequence[Row],
    tokenizer: Any,
    max_prompt_seq_len: int,
    prompt_overflow: str,
    fmt: ChatFormat | None = None,
) -> tuple[dict[str, list], dict]:
    """PPO rows -> {"prompt": [prompt ids, at most max_prompt_seq_len], "extra": [each kept row's extra
    columns as JSON, "" for none], "prompt_text": [each kept row's prompt text]} ("extra" only when some row
    has any, "prompt_text" only with a chat format), plus counts."""
    if prompt_overflow not in PROMPT_OVERFLOW_POLICIES:
        raise ValueError(f"prompt_overflow={prompt_overflow!r}: expected one of {PROMPT_OVERFLOW_POLICIES}")
    prompts = encode_prompts(rows, tokenizer, fmt)
    out: dict[str, list] = {"prompt": [], "extra": [], "prompt_text": []}
    counts = {"rows_in": len(rows), "prompt_truncated": 0, "prompt_dropped": 0}
    for prompt, row in zip(prompts, rows, strict=True):
        if len(prompt) > max_prompt_seq_len:
            if prompt_overflow == "drop":
                counts["prompt_dropped"] += 1
                continue
            counts["prompt_truncated"] += 1
            prompt = prompt[-max_prompt_seq_len:]
        out["prompt"].append(prompt)
        out["extra"].append(row.extra)
        out["prompt_text"].append(row.prompt)
    if not any(out["extra"]):
        del out["extra"]
    if fmt is None:
        del out["prompt_text"]
    counts["rows_out"] = len(out["prompt"])
    return out, counts
