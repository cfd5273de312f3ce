"""No import cycles among sharpbench's own modules, function-local imports counted.

Every module of the package is parsed with ``ast`` (never imported); each ``import`` and
``from ... import`` anywhere in it (module level, functions, classes, ``if`` blocks) that names a
module of the package is an edge, relative imports resolved. ``from . import x`` counts as an
import of ``sharpbench.x`` when that is a module, else of the package ``__init__``. A package
``__init__`` that is imported on the way (``sharpbench.sharpness`` for
``sharpbench.sharpness.plots``) is not counted: Python runs it first, but it is an edge only when
it is named itself.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "sharpbench"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_files(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return name in files and files[name].name == "__init__.py"


def imports_of(name: str, path: Path, files: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` (at ``path``) imports, wherever in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def known(target: str) -> str | None:  # the longest prefix that is a module of the package
        while target and target not in files:
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    target = known(alias.name)
                    if target:
                        found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in files:  # from . import x  /  from .pkg import mod
                    found.add(sub)
                else:
                    target = known(source)
                    if target:
                        found.add(target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, files) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted, plus
    one concrete cycle through each for the message."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One closed path inside ``component`` (for a readable failure)."""
    members, start = set(component), component[0]
    path, seen = [start], {start}

    def walk(v: str) -> bool:
        for w in sorted(graph[v] & members):
            if w == start:
                path.append(w)
                return True
            if w not in seen:
                seen.add(w)
                path.append(w)
                if walk(w):
                    return True
                path.pop()
        return False
    walk(start)
    return path


def describe(graph: dict[str, set[str]]) -> list[str]:
    return [" -> ".join(a_cycle(graph, c)) + f"   (component: {', '.join(c)})"
            for c in cycles(graph)]


def test_the_graph_sees_local_and_relative_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\nfrom . import c\n")
    (pkg / "sub" / "c.py").write_text("import sharpbench.a\n")
    files = module_files(pkg)
    graph = {n: imports_of(n, p, files) for n, p in files.items()}
    assert graph["sharpbench.a"] == {"sharpbench.sub.b"}
    assert graph["sharpbench.sub.b"] == {"sharpbench.a", "sharpbench.sub.c"}
    assert graph["sharpbench.sub.c"] == {"sharpbench.a"}
    assert cycles(graph) == [["sharpbench.a", "sharpbench.sub.b", "sharpbench.sub.c"]]


def test_no_import_cycles():
    found = describe(import_graph())
    assert not found, "import cycles among sharpbench's modules:\n" + "\n".join(found)


if __name__ == "__main__":
    for line in describe(import_graph()) or ["no cycles"]:
        print(line)
