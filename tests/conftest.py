"""Shared fixtures: the tiny built-in model and tokenizer, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny default (OPT architecture, seed 0) in Hugging Face format."""
    from common.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny") / "opt", arch="opt", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)
