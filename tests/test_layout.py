"""The package's layout: no import circle, and the public paths of before the split still work."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import grimp

import lofit

SOURCE = Path(lofit.__file__).parent

COMPATIBILITY = {
    "lofit.steps": ["lofit.methods.lofit.steps", "lofit.methods.lofit.ranking"],
    "lofit.objectives": ["lofit.training.objectives"],
    "lofit.batching": ["lofit.data.batching"],
    "lofit.datafiles": ["lofit.data.files"],
    "lofit.hub": ["lofit.models.hub", "lofit.methods.hub"],
}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            components.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_no_module_imports_itself_through_others():
    """Every import counts, also those inside functions and under TYPE_CHECKING."""
    graph = grimp.build_graph("lofit", cache_dir=None)
    edges = {module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules}
    circles = [sorted(component) for component in strongly_connected(edges) if len(component) > 1]
    assert circles == []


def test_the_public_api_of_the_readme_works_through_the_old_paths():
    from lofit.batching import tokenize_pair
    from lofit.data.batching import tokenize_pair as moved_tokenize_pair
    from lofit.methods.lofit.model import LofitModel, get_lofit_model
    from lofit.objectives import DPO, SFT, build_objective
    from lofit.steps import HeadRanking, select_heads, tune_biases
    from lofit.training import objectives

    assert lofit.LofitModel is LofitModel and lofit.get_lofit_model is get_lofit_model
    assert callable(lofit.load_model) and lofit.LofitConfig().num_heads
    assert (SFT, DPO, build_objective) == (objectives.SFT, objectives.DPO, objectives.build_objective)
    assert tokenize_pair is moved_tokenize_pair
    assert HeadRanking.__module__ == "lofit.methods.lofit.ranking"
    assert select_heads.__module__ == tune_biases.__module__ == "lofit.methods.lofit.steps"


def test_compatibility_modules_only_re_export():
    """Each old path is imports from its new modules and ``__all__``, nothing of its own."""
    for old, new in COMPATIBILITY.items():
        module = importlib.import_module(old)
        tree = ast.parse(Path(module.__file__).read_text())
        for node in tree.body:
            is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            is_all = isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]
            assert is_docstring or is_all or (isinstance(node, ast.ImportFrom) and node.module in new), (
                old,
                ast.dump(node),
            )
        for name in module.__all__:
            assert any(getattr(importlib.import_module(m), name, None) is getattr(module, name) for m in new), (
                old,
                name,
            )


def test_few_modules_at_the_top_level():
    top = sorted(path.stem for path in SOURCE.glob("*.py"))
    compatibility = sorted(name.removeprefix("lofit.") for name in COMPATIBILITY)
    assert sorted(set(top) - set(compatibility)) == ["__init__", "_version", "cli", "harness"]
