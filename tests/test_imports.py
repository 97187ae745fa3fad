"""The import graph of `teal/` (every import statement, also those inside functions) has no circle, and
its layers point one way: kernels never import the engine, the engine never imports a benchmark.

The root `teal/__init__.py` is the public facade (re-exports only): `from teal import Thresholds` counts as
an import of the module that defines `Thresholds`; `import teal` and `from teal import __version__` add no edge.
Imports under `if __name__ == "__main__":` count like any other: a module whose `python -m` block imports what
imports it is a circle to a reader (and to the before-stop hook). A command run by `python -m` lives in a
package's `__main__.py`, which nothing imports (`teal/bench/decode/__main__.py`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "teal"

#: (importer prefix, imported prefix) pairs that must never occur
FORBIDDEN = [("teal.kernels", "teal.engine"), ("teal.engine", "teal.bench")]


def module_files(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of every module under `root` (a package directory)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is a module of the tree (None: outside it)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _facade(root_name: str, modules: dict[str, Path]) -> dict[str, str]:
    """Names the root package re-exports: {name: defining module}."""
    tree = ast.parse(modules[root_name].read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                out[alias.asname or alias.name] = target if target in modules else node.module
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: modules of the tree it imports}, from every import statement of every module."""
    modules = module_files(root)
    root_name = root.name
    facade = _facade(root_name, modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    if module == root_name and name != root_name:
                        targets.append(facade.get(alias.name, f"{root_name}.{alias.name}"))
                    else:
                        targets.append(f"{module}.{alias.name}")
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name and not (resolved == root_name and name != root_name):
                    edges.add(resolved)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def forbidden_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    def under(module: str, prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    return sorted((a, b) for a, edges in graph.items() for b in edges
                  for src, dst in FORBIDDEN if under(a, src) and under(b, dst))


def test_teal_has_no_import_circle():
    graph = import_graph(ROOT)
    assert len(graph) > 30 and graph["teal.engine.model"], "the walk found too few modules or imports"
    assert cycles(graph) == []


def test_entry_modules_are_imported_by_nothing():
    """`python -m teal.bench.decode` runs the package's `__main__.py`: the one place that may import what
    imports the package (the command line), as long as no module imports it back."""
    graph = import_graph(ROOT)
    assert {"teal.bench.decode.__main__", "teal.bench.kernels.__main__"} <= set(graph)
    assert sorted((a, b) for a, edges in graph.items() for b in edges if b.endswith(".__main__")) == []


def test_kernels_never_import_the_engine_and_the_engine_never_imports_a_benchmark():
    assert forbidden_edges(import_graph(ROOT)) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "teal"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    # a circle through an import inside a function, and one through the facade's re-export
    ({"__init__.py": "", "a.py": "def f():\n    from teal.b import B\n", "b.py": "from teal.a import f\nB = 1\n"},
     [["teal.a", "teal.b"]]),
    ({"__init__.py": "from teal.b import B\n", "a.py": "def f():\n    from teal import B\n",
      "b.py": "from . import a\nB = 1\n"}, [["teal.a", "teal.b"]]),
    ({"__init__.py": "__version__ = '0'\n", "a.py": "from teal import __version__\n"}, []),
    # a module's `python -m` block counts; a package's `__main__.py`, which nothing imports, closes no circle
    ({"__init__.py": "", "a.py": "if __name__ == '__main__':\n    import teal.b\n", "b.py": "import teal.a\n"},
     [["teal.a", "teal.b"]]),
    ({"__init__.py": "", "a/__init__.py": "", "a/__main__.py": "import teal.b\n", "b.py": "import teal.a\n"}, []),
])
def test_the_walk_finds_circles(tmp_path, files, expected):
    assert cycles(import_graph(_tree(tmp_path, files))) == expected


def test_the_walk_finds_forbidden_edges(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "", "kernels/__init__.py": "", "kernels/x.py":
                            "def f():\n    from teal.engine.model import rms_norm\n",
                            "engine/__init__.py": "", "engine/model.py": "import teal.bench.decode\n",
                            "bench/__init__.py": "", "bench/decode.py": ""})
    assert forbidden_edges(import_graph(root)) == [("teal.engine.model", "teal.bench.decode"),
                                                   ("teal.kernels.x", "teal.engine.model")]


def shadowing_imports(tree: ast.AST) -> list[tuple[str, int]]:
    """(function, line) of each import inside a function that binds one of that function's parameters (``from
    teal.bench import quant_kernels`` in a function taking ``quant_kernels`` replaced the caller's argument by the
    module: `teal bench kernels --quant-kernels` crashed on the GPU)."""
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        args = fn.args
        params = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
        params |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound = {(alias.asname or alias.name).split(".")[0] for alias in node.names}
                out += [(fn.name, node.lineno) for _ in bound & params]
    return out


def test_no_function_imports_over_its_own_parameter():
    found = {name: shadowing_imports(ast.parse(path.read_text(encoding="utf-8")))
             for name, path in module_files(ROOT).items()}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_shadowing_walk_finds_an_import_over_a_parameter():
    tree = ast.parse("def run(quant_kernels=None):\n    if True:\n        from teal.bench import quant_kernels\n"
                     "def ok(names):\n    from teal.bench import quant_kernels as quant_bench\n")
    assert shadowing_imports(tree) == [("run", 3)]
