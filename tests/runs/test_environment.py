"""What a fresh environment needs so that the suite cannot turn red overnight: pinned installs, DeepSpeed's
C++ ops built once per environment, and a hybrid engine that falls back instead of crashing where
DeepSpeed cannot build its inference kernels (CPU, or a model type without a policy)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from step3_rlhf import engines as engines_module
from step3_rlhf.engines import hybrid_engine_unavailable

pytestmark = pytest.mark.slow  # pip and a fresh environment

REPO = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: '{line}' is not an exact pin (name==version)"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_constraints_pin_every_requirement_exactly_but_not_torch():
    pins = _pins()
    names = [
        re.split(r"[<>=!~ \[]", line, maxsplit=1)[0].lower()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert names and "deepspeed" in names
    missing = [n for n in names if n != "torch" and n not in pins]
    assert not missing, f"requirements without a pin in constraints.txt: {missing}"
    assert "torch" not in pins, "a pinned torch would replace a GPU user's CUDA build"


def test_setup_and_ci_install_with_the_constraints():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert 'CONSTRAINTS="${CONSTRAINTS:-$ROOT/constraints.txt}"' in setup
    assert '"${constraint_args[@]}" --no-build-isolation -r "$ROOT/requirements.txt"' in setup
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    assert "source" in (REPO / "scripts" / "test.sh").read_text()


def test_the_installed_versions_are_the_pinned_ones():
    """The environment the suite runs in is the locked one (skipped in scripts/check_latest.sh's)."""
    from importlib.metadata import version

    if os.environ.get("CONSTRAINTS") == "none":
        pytest.skip("check_latest.sh: newest releases on purpose")
    pins = _pins()
    for name in ("deepspeed", "transformers", "peft", "datasets", "tokenizers", "safetensors"):
        assert version(name) == pins[name], (
            f"{name} {version(name)} installed, constraints.txt pins {pins[name]}"
        )


def test_extensions_are_built_inside_the_environment(tmp_path):
    """In a virtual environment, DeepSpeed's JIT builds go to <venv>/torch_extensions unless the user chose a
    directory; setup prebuilt the CPU op there, so a stage never compiles it."""
    code = "from common.dist import use_environment_extensions_dir as u; print(u())"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    in_venv = sys.prefix != sys.base_prefix
    expected = str(Path(sys.prefix) / "torch_extensions") if in_venv else "None"
    assert out.stdout.strip() == expected, out.stderr
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == str(tmp_path), "a directory the user chose is kept"
    if in_venv and not __import__("torch").cuda.is_available():
        assert any((Path(sys.prefix) / "torch_extensions").glob("deepspeed_shm_comm*/*.so")), (
            "scripts/setup.sh did not prebuild DeepSpeed's CPU shared-memory op into the environment"
        )


def test_hybrid_engine_unavailable_on_cpu_for_a_model_with_a_policy(tiny_dir):
    """The tiny OPT has a DeepSpeed inference policy, whose kernels cannot be built on CPU: a reason, no raise
    (DeepSpeed itself raises 'This op had not been implemented on CPU backend' from initialize())."""
    import torch
    from transformers import AutoModelForCausalLM

    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    reason = hybrid_engine_unavailable(model)
    assert reason is not None and "cpu accelerator" in reason and "not been implemented" in reason


def test_hybrid_engine_unavailable_for_a_model_without_a_policy(monkeypatch):
    class Loads:
        def load(self, verbose=False):
            return object()

    monkeypatch.setattr("deepspeed.ops.op_builder.InferenceBuilder", Loads)
    assert "no inference policy for Sequential" in hybrid_engine_unavailable(nn.Sequential(nn.Linear(2, 2)))


def test_hybrid_engine_available_when_policy_and_kernels_are(monkeypatch, tiny_dir):
    from transformers import AutoModelForCausalLM

    class Loads:
        def load(self, verbose=False):
            return object()

    monkeypatch.setattr("deepspeed.ops.op_builder.InferenceBuilder", Loads)
    assert hybrid_engine_unavailable(AutoModelForCausalLM.from_pretrained(tiny_dir)) is None


def test_hybrid_config_falls_back_with_one_warning(monkeypatch, capsys):
    """--enable_hybrid_engine where the kernels are unavailable: no hybrid section, a warning naming why."""
    from types import SimpleNamespace

    args = SimpleNamespace(enable_hybrid_engine=True)
    monkeypatch.setattr(engines_module, "hybrid_engine_unavailable", lambda m: "no kernels here")
    assert engines_module._hybrid_engine_config(args, nn.Linear(1, 1)) is None
    out = capsys.readouterr().out
    assert out.count("warning: --enable_hybrid_engine: no kernels here") == 1 and "generate()" in out
    args.enable_hybrid_engine = False
    assert engines_module._hybrid_engine_config(args, nn.Linear(1, 1)) is None
    assert capsys.readouterr().out == ""
