"""The layers point one way. The stages (step1_sft/, step2_reward/, step2_dpo/, step3_rlhf/) import
common/; nothing in common/ imports a stage, at module level or inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("step1_sft", "step2_reward", "step2_dpo", "step3_rlhf")


def stage_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import of a stage package in `source`, however deeply nested."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in STAGES]
    return found


def test_stage_imports_are_found_at_any_depth():
    source = (
        "import os\nfrom step2_reward.normalize import resolve_sample\n"
        "def f():\n    import step3_rlhf.args as a\n    from common import dist\n"
        "class C:\n    def g(self):\n        import step1_sft, json\n"
    )
    assert stage_imports(source) == [(2, "step2_reward.normalize"), (4, "step3_rlhf.args"), (8, "step1_sft")]
    assert stage_imports("from common.data import build\nimport step2_rewards_like_name\n") == []


@pytest.mark.parametrize("path", sorted(ROOT.glob("common/**/*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_common_imports_no_stage(path):
    assert stage_imports(path.read_text()) == [], f"{path.relative_to(ROOT)} imports a stage package"


def test_common_modules_exist():  # the glob above found the layer (not an empty parametrisation)
    assert len(list(ROOT.glob("common/**/*.py"))) > 10


@pytest.mark.slow
@pytest.mark.parametrize("module", ["common.args", "common.validate", "common.data"])
def test_a_common_module_imported_first_loads_no_stage(module):
    code = (
        f"import sys, {module}, common.args as a, common.validate as v\n"
        "a.check_args\nv.check_counts\n"
        f"stages = sorted(m for m in sys.modules if m.split('.')[0] in {STAGES!r})\n"
        "print(stages)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
