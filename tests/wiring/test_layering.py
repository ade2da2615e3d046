"""The layers point one way. The stages (step1_sft/, step2_reward/, step2_dpo/, step3_rlhf/) import
common/; nothing in common/ imports a stage, at module level or inside a function; and no module of the
project imports, at module level, one that imports it back (the import graph has no cycles)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("step1_sft", "step2_reward", "step2_dpo", "step3_rlhf")
PACKAGES = ("common", "tools", "pipeline", *STAGES)


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


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports at module level (`from a.b import c` counts a.b.c when that is a
    module, else a.b); imports inside functions are deferred on purpose and do not count."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            }
    return {m for m in found if m in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_by_hand():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_import_graph_has_no_cycles():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("**/*.py"))]
    modules = {module_name(p) for p in files}
    graph = {module_name(p): module_level_imports(p, modules) - {module_name(p)} for p in files}
    assert len(graph) > 60 and graph["step3_rlhf.main"], "the graph was not built"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
