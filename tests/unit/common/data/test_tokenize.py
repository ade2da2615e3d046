"""Per-stage tokenization and collation: EOS as an id, label masks, truncation/drop policies, padding sides."""

from __future__ import annotations

import pytest
import torch

from common.data.collate import PairCollator, PromptCollator, SFTCollator, collator_for_stage
from common.data.rows import Row
from common.data.stage_datasets import IGNORE_INDEX, PairDataset, PromptDataset, SFTDataset, TokenLists
from common.data.tokenize import (
    check_tokenizer,
    fit_to_length,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_sft,
    tokenizer_fingerprint,
)
from tests.data_files import encode, make_tokenizer


@pytest.fixture
def tok():
    return make_tokenizer()


def rows_of(*triples) -> list[Row]:
    return [Row(p, c, r, f"test row {i}") for i, (p, c, r) in enumerate(triples)]


ROWS = rows_of(
    ("\n\nHuman: How do I bake bread?\n\nAssistant:", " Mix flour and water.", " No."),
    ("\n\nHuman: Hi\n\nAssistant:", " Paris is the capital of France.", " I do not know."),
    ("\n\nHuman: capital?\n\nAssistant:", " Paris", " Go away. Nobody cares."),
)


def test_pad_must_exist_and_differ_from_eos():
    check_tokenizer(make_tokenizer())
    with pytest.raises(ValueError, match="pad_token_id is None"):
        check_tokenizer(make_tokenizer(pad=False))
    same = make_tokenizer(pad=False)
    same.pad_token = same.eos_token
    with pytest.raises(ValueError, match="pad_token_id == eos_token_id"):
        check_tokenizer(same)


def test_sft_sequences_are_prompt_then_chosen_then_one_eos(tok):
    out, counts = tokenize_sft(ROWS, tok, max_seq_len=512)
    assert counts == {"rows_in": 3, "prompt_truncated": 0, "dropped_too_long": 0, "rows_out": 3}
    for row, ids, prompt_len in zip(ROWS, out["input_ids"], out["prompt_len"], strict=True):
        prompt = encode(tok, row.prompt)
        assert ids == prompt + encode(tok, row.chosen) + [tok.eos_token_id]
        assert prompt_len == len(prompt)
        assert ids.count(tok.eos_token_id) == 1 and tok.pad_token_id not in ids


def test_rm_sequences_each_end_in_exactly_one_eos(tok):
    out, counts = tokenize_pairs(ROWS, tok, max_seq_len=512)
    assert counts["rows_out"] == 3
    for row, chosen, rejected in zip(ROWS, out["chosen"], out["rejected"], strict=True):
        assert chosen == encode(tok, row.prompt) + encode(tok, row.chosen) + [tok.eos_token_id]
        assert rejected == encode(tok, row.prompt) + encode(tok, row.rejected) + [tok.eos_token_id]
        for seq in (chosen, rejected):
            assert seq.index(tok.eos_token_id) == len(seq) - 1


def test_eos_and_pad_written_as_text_stay_text(tok):
    rows = rows_of(("\n\nHuman: say </s> and <pad>\n\nAssistant:", " ok </s> done", " no<pad>"))
    assert tok.eos_token_id in encode(tok, " ok </s> done")  # what a naive tokenizer call would do
    sft, _ = tokenize_sft(rows, tok, 512)
    pairs, _ = tokenize_pairs(rows, tok, 512)
    for seq in sft["input_ids"] + pairs["chosen"] + pairs["rejected"]:
        assert seq.count(tok.eos_token_id) == 1 and seq[-1] == tok.eos_token_id
        assert tok.pad_token_id not in seq
    assert tok.decode(sft["input_ids"][0][:-1]) == rows[0].prompt + rows[0].chosen


def test_fit_to_length_keeps_response_and_prompt_end():
    assert fit_to_length([1, 2, 3, 4], [7, 8, 9], 5) == ([3, 4, 7, 8, 9], 2)
    assert fit_to_length([1, 2], [7, 9], 5) == ([1, 2, 7, 9], 2)
    assert fit_to_length([1, 2], [7, 8, 9], 3) is None  # no room for a single prompt token
    assert fit_to_length([1, 2], [7, 8, 9, 10], 3) is None


def test_overlong_sft_rows_truncate_the_prompt_from_the_left_or_drop(tok):
    long_prompt = "\n\nHuman: " + "bread water salt " * 20 + "\n\nAssistant:"
    long_answer = " " + "flour " * 40
    rows = rows_of(
        (long_prompt, " Paris.", None), (ROWS[0].prompt, long_answer, None), (ROWS[2].prompt, " Paris", None)
    )
    max_len = 24
    out, counts = tokenize_sft(rows, tok, max_seq_len=max_len)
    assert counts == {"rows_in": 3, "prompt_truncated": 1, "dropped_too_long": 1, "rows_out": 2}
    response = encode(tok, " Paris.") + [tok.eos_token_id]
    first = out["input_ids"][0]
    assert len(first) == max_len and first[-len(response) :] == response
    assert first[: -len(response)] == encode(tok, long_prompt)[-(max_len - len(response)) :]  # prompt's END
    assert tok.decode(first[: out["prompt_len"][0]]).endswith("\n\nAssistant:")


def test_overlong_rm_pair_is_dropped_once(tok):
    rows = rows_of(
        (ROWS[0].prompt, " Paris", " " + "flour " * 40), (ROWS[1].prompt, ROWS[1].chosen, ROWS[1].rejected)
    )
    out, counts = tokenize_pairs(rows, tok, max_seq_len=24)
    assert counts["dropped_too_long"] == 1 and counts["rows_out"] == 1
    assert len(out["chosen"]) == len(out["rejected"]) == 1


@pytest.mark.parametrize("policy", ["truncate_left", "drop"])
def test_ppo_prompt_overflow_policy(tok, policy):
    long_prompt = "\n\nHuman: " + "bread water salt " * 20 + "\n\nAssistant:"
    rows = rows_of((long_prompt, " x", None), (ROWS[1].prompt, " x", None))
    limit = 12
    assert len(encode(tok, long_prompt)) > limit >= len(encode(tok, ROWS[1].prompt))
    out, counts = tokenize_prompts(rows, tok, limit, policy)
    if policy == "truncate_left":
        assert counts == {"rows_in": 2, "prompt_truncated": 1, "prompt_dropped": 0, "rows_out": 2}
        assert out["prompt"][0] == encode(tok, long_prompt)[-limit:]
        assert tok.decode(out["prompt"][0]).endswith("Assistant:")
    else:
        assert counts == {"rows_in": 2, "prompt_truncated": 0, "prompt_dropped": 1, "rows_out": 1}
        assert out["prompt"] == [encode(tok, ROWS[1].prompt)]
    with pytest.raises(ValueError, match="prompt_overflow"):
        tokenize_prompts(rows, tok, limit, "truncate_right")


def test_tokenizer_fingerprint_changes_with_vocab_and_special_tokens():
    a, b = make_tokenizer(), make_tokenizer()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b(["some text", "more"], padding=True, truncation=True, max_length=3)  # leaves state on the backend
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.add_special_tokens({"pad_token": "<newpad>"})
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)


# ---- datasets and collators ------------------------------------------------------------------------------


def test_token_lists_round_trip():
    seqs = [[5, 6, 7], [], [8]]
    lists = TokenLists.from_lists(seqs)
    assert [lists[i].tolist() for i in range(len(lists))] == seqs
    assert lists[0].dtype == torch.long


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_sft_labels_are_ignored_exactly_on_pads_and_masked_prompts(tok, mask_prompt):
    out, _ = tokenize_sft(ROWS, tok, 512)
    ds = SFTDataset(TokenLists.from_lists(out["input_ids"]), torch.tensor(out["prompt_len"]), mask_prompt)
    batch = SFTCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    for i, seq in enumerate(out["input_ids"]):
        n, p = len(seq), out["prompt_len"][i]
        assert batch["input_ids"][i, :n].tolist() == seq  # right padding: sequence first
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        ignored = (batch["labels"][i] == IGNORE_INDEX).nonzero().flatten().tolist()
        expected = (list(range(p)) if mask_prompt else []) + list(range(n, batch["input_ids"].shape[1]))
        assert ignored == expected
        kept = batch["labels"][i] != IGNORE_INDEX
        assert torch.equal(batch["labels"][i][kept], batch["input_ids"][i][kept])
        assert batch["labels"][i][n - 1] == tok.eos_token_id  # the model learns to stop


def test_pair_collator_stacks_chosen_then_rejected(tok):
    out, _ = tokenize_pairs(ROWS, tok, 512)
    lens = [torch.tensor(out[f"{side}_prompt_len"]) for side in ("chosen", "rejected")]
    ds = PairDataset(TokenLists.from_lists(out["chosen"]), TokenLists.from_lists(out["rejected"]), *lens)
    batch = PairCollator(tok.pad_token_id)([ds[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 6
    for i, seq in enumerate(out["chosen"] + out["rejected"]):
        assert batch["input_ids"][i, : len(seq)].tolist() == seq
        assert batch["attention_mask"][i].sum() == len(seq)
        assert (batch["input_ids"][i, len(seq) :] == tok.pad_token_id).all()
    prompts = [encode(tok, row.prompt) for row in ROWS]
    assert batch["prompt_lens"].tolist() == [len(p) for p in prompts] * 2


def test_pair_prompt_lengths_count_the_prompt_tokens_each_side_kept(tok):
    """DPO scores the tokens after the prompt: each side's prompt_len is where its response starts, also
    when truncation cut the two sides' prompts differently."""
    prompt = "\n\nHuman: " + "tell me a long story about bread " * 3 + "\n\nAssistant:"
    rows = rows_of((prompt, " Short.", " A much longer rejected answer that takes more room."))
    max_len = len(encode(tok, rows[0].rejected)) + 5  # room for 4 prompt tokens beside the rejected answer
    out, _ = tokenize_pairs(rows, tok, max_seq_len=max_len)
    for side in ("chosen", "rejected"):
        seq, n = out[side][0], out[f"{side}_prompt_len"][0]
        response = encode(tok, getattr(rows[0], side)) + [tok.eos_token_id]
        assert seq[n:] == response and seq[:n] == encode(tok, prompt)[-n:]
    assert out["chosen_prompt_len"][0] > out["rejected_prompt_len"][0]


def test_prompt_collator_pads_on_the_left(tok):
    out, _ = tokenize_prompts(ROWS, tok, 256, "truncate_left")
    ds = PromptDataset(TokenLists.from_lists(out["prompt"]))
    batch = PromptCollator(tok.pad_token_id)([ds[i] for i in range(3)])
    width = batch["input_ids"].shape[1]
    assert width == max(len(p) for p in out["prompt"])
    for i, prompt in enumerate(out["prompt"]):
        n_pad = width - len(prompt)
        assert batch["input_ids"][i, n_pad:].tolist() == prompt  # pads first, last token real
        assert (batch["input_ids"][i, :n_pad] == tok.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [0] * n_pad + [1] * len(prompt)
    assert (batch["attention_mask"][:, -1] == 1).all()
    assert any(width > len(p) for p in out["prompt"])  # the test really exercised padding


def test_collator_for_stage():
    assert isinstance(collator_for_stage(1, 0), SFTCollator)
    assert isinstance(collator_for_stage(2, 0), PairCollator)
    assert isinstance(collator_for_stage(3, 0), PromptCollator)
    with pytest.raises(ValueError):
        collator_for_stage(4, 0)
