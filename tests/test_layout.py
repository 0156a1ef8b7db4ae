"""The package's shape, checked from its source: module sizes, the top level, import circles, comments.

Read with ``ast`` and ``tokenize``, nothing imported, so a circle that only shows on some import order is
still found, and the checks run in a fraction of a second.

    .venv/bin/python -m pytest -q tests/test_layout.py
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

PACKAGE = "automl_tl"
PACKAGE_DIR = REPO_ROOT / PACKAGE
MAX_MODULE_LINES = 450
MAX_TOP_LEVEL_MODULES = 8
# A measured figure: a number followed by a unit of time, throughput or memory ("14.2 ms", "69 img/s", "1,897 MB").
FIGURE = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:ms|img/s|MB|MiB|GB|GiB)(?!\w)")


def module_name(path: Path) -> str:
    """``automl_tl/sweep/driver.py`` -> ``automl_tl.sweep.driver``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


MODULES = package_modules()


def _nearest_module(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``dotted`` that is one of our modules (``automl_tl.data.load.load_data`` ->
    ``automl_tl.data.load``), or None when it is not ours."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imported_modules(name: str, source: str, modules: dict[str, Path]) -> set[str]:
    """Every one of ``modules`` that module ``name`` (whose text is ``source``) imports anywhere: at module
    level, inside functions, under ``if TYPE_CHECKING:``, absolute or relative. ``from P import x`` counts as
    importing ``P.x`` when that is a module, else ``P``."""
    own_package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = own_package.split(".")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                source_module = f"{base}.{node.module}" if node.module else base
            else:
                source_module = node.module or ""
            targets = [f"{source_module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            module = _nearest_module(target, modules)
            if module is not None:
                found.add(module)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, leaving out its own parent packages: importing
    ``automl_tl.data.sources`` runs ``automl_tl/data/__init__.py`` anyway, and a package that re-exports
    its submodules is not a circle."""
    graph = {}
    for name in MODULES:
        parents = {name.rsplit(".", n)[0] for n in range(1, name.count(".") + 1)}
        source = MODULES[name].read_text(encoding="utf-8")
        graph[name] = imported_modules(name, source, MODULES) - parents - {name}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that can each reach every other one of the group."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [g for g in groups if len(g) > 1]


def one_circle(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group (breadth first)."""
    start, members = group[0], set(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{group} is strongly connected but no path returns to {start}")


def comments_and_docstrings(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every ``#`` comment and every module, class and function docstring of a file."""
    source = path.read_text(encoding="utf-8")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):  # fmt: skip
                for offset, line in enumerate(first.value.value.splitlines()):
                    yield first.lineno + offset, line


def figures_in_comments() -> list[str]:
    hits = []
    for name, path in MODULES.items():
        for line, text in comments_and_docstrings(path):
            for figure in FIGURE.findall(text):
                hits.append(f"{path.relative_to(REPO_ROOT)}:{line}: {figure!r} in {text.strip()[:100]!r}")
    return hits


# --- the checks ----------------------------------------------------------------------------------------------


def test_no_module_is_over_450_lines() -> None:
    long = {str(p.relative_to(REPO_ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}  # fmt: skip
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concept): {long}"


def test_at_most_8_modules_at_the_top_level() -> None:
    top = sorted(p.name for p in PACKAGE_DIR.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules at {PACKAGE}/'s top level: {top}"


def test_no_import_circle() -> None:
    graph = import_graph()
    circles = [" -> ".join(one_circle(graph, group)) for group in strongly_connected(graph)]
    assert not circles, "import circles (a lower stage must not import a higher one, even lazily):\n" + "\n".join(
        circles
    )


def test_no_measured_figure_in_a_comment() -> None:
    hits = figures_in_comments()
    assert not hits, (
        "a comment says why in one sentence; the figure goes to benchmarks/results/ and docs/:\n" + "\n".join(hits)
    )


# --- the checkers themselves, on made-up sources ---------------------------------------------------------------


def test_the_figure_pattern_finds_figures_and_nothing_else() -> None:
    found = FIGURE.findall("went from 21.3 to 16.9 ms; 63.9 img/s, 1,897 MB, 7.5 GiB, 4GB, 12MiB and 80 MB/s")
    assert found == ["16.9 ms", "63.9 img/s", "1,897 MB", "7.5 GiB", "4GB", "12MiB", "80 MB"]
    for text in ("batch_wait_ms=2", "max_body_mb", "timeout_ms", "in 3 msgs", "page 2 MBps", "v1.5 models", "x2 mb"):
        assert not FIGURE.findall(text), text


def test_the_circle_finder_reports_each_circle_once() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "f"}, "f": set(), "g": {"a"}}
    groups = strongly_connected(graph)
    assert sorted(groups) == [["a", "b", "c"], ["d", "e"]]
    assert one_circle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert one_circle(graph, ["d", "e"]) == ["d", "e", "d"]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_the_import_walk_sees_lazy_relative_and_type_checking_imports() -> None:
    modules = {name: Path(name.replace(".", "/") + ("/__init__.py" if name in ("p", "p.sub") else ".py"))
               for name in ("p", "p.sub", "p.sub.low", "p.sub.high", "p.top", "p.other")}  # fmt: skip
    source = """
from __future__ import annotations
from typing import TYPE_CHECKING
import numpy
from . import low
if TYPE_CHECKING:
    from p.top import Thing
def later() -> None:
    from ..other import helper
    import p.sub.high.inner_name
"""
    assert imported_modules("p.sub.mod", source, {**modules, "p.sub.mod": Path("p/sub/mod.py")}) == {
        "p.sub.low", "p.top", "p.other", "p.sub.high",
    }  # fmt: skip
    assert imported_modules("p.sub", "from .low import f\nfrom . import high", modules) == {"p.sub.low", "p.sub.high"}


def test_the_real_graph_has_only_our_modules_and_no_parent_edges() -> None:
    edges = import_graph()
    assert all(target in MODULES for targets in edges.values() for target in targets)
    assert all(not name.startswith(target + ".") for name, targets in edges.items() for target in targets)
    # automl_tl/__init__.py imports config and errors at module level and the rest under TYPE_CHECKING
    assert {"automl_tl.config", "automl_tl.errors", "automl_tl.api"} <= edges[PACKAGE]
