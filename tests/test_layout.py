"""The package's import graph: no cycles, imports only sideways or down the layers, light roots.

Every module under ``refq_cli/`` is read with :mod:`ast`, and every import it makes counts: at
module level, inside functions (lazy imports) and under ``TYPE_CHECKING``. Dynamic imports
(``importlib``, entry points) are not seen. ``from refq_cli.pkg import name`` is an import of the
module ``refq_cli.pkg.name`` where that is a module or package, else of ``refq_cli.pkg``.

``from refq_cli import __version__`` is allowed anywhere: it is a constant, and
:func:`test_the_package_root_is_a_light_home_for_the_version` checks that importing the root
imports nothing else. It is therefore not an edge of the graph either.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "refq_cli"
ROOT = Path(__file__).resolve().parents[1]

# Rank, name and the modules of each layer: a name covers itself and its submodules, except
# where it is marked exact. An import may point to the same or a lower rank only.
LAYERS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (0, "base", ("refq_cli.errors", "refq_cli.kinds", "refq_cli.schemas")),
    (1, "io", ("refq_cli.io",)),
    (2, "spec", ("refq_cli.spec",)),
    (3, "quant", ("refq_cli.quant",)),
    (4, "reference", ("refq_cli.reference",)),
    (5, "deploy", ("refq_cli.deploy",)),
    (6, "pipeline", ("refq_cli.pipeline",)),
    (7, "cli", ("refq_cli.cli",)),
    (8, "root", ("=refq_cli", "=refq_cli.__main__")),
)

# Importing one of these must not import torch: ``refq --help`` and light library use rely on it.
# (``refq_cli.reference`` is the home of the torch modules: its __init__ imports them.)
LIGHT_PACKAGES = (
    "refq_cli",
    "refq_cli.io",
    "refq_cli.quant",
    "refq_cli.spec",
    "refq_cli.pipeline",
    "refq_cli.deploy",
    "refq_cli.cli",
)


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    path: str  # the importer's file, relative to the root it was read from
    line: int
    target: str  # the module imported
    where: str  # "" at module level, else "in f()" / "under TYPE_CHECKING"

    def at(self) -> str:
        return f"{self.path}:{self.line}"

    def describe(self) -> str:
        return f"{self.importer} imports {self.target}" + (f" ({self.where})" if self.where else "")


def module_files(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` under ``root``, by dotted name."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


class _Imports(ast.NodeVisitor):
    """The imports of one module, each with where in the module it is."""

    def __init__(self, module: str, is_package: bool, path: str, modules: set[str], package: str):
        self.module, self.path, self.modules, self.package = module, path, modules, package
        self.context_package = module if is_package else module.rpartition(".")[0]
        self.where: list[str] = []
        self.found: list[Import] = []

    def _ours(self, name: str) -> bool:
        return name == self.package or name.startswith(self.package + ".")

    def _add(self, node: ast.AST, target: str) -> None:
        where = self.where[-1] if self.where else ""
        found = Import(self.module, self.path, node.lineno, target, where)
        if target != self.module and found not in self.found:  # one per line and target
            self.found.append(found)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        name = getattr(node, "name", "<lambda>")
        self.where.append(f"in {name}()")
        self.generic_visit(node)
        self.where.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        typing_only = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        if not typing_only:
            self.generic_visit(node)
            return
        self.where.append("under TYPE_CHECKING")
        for child in node.body:
            self.visit(child)
        self.where.pop()
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if self._ours(alias.name):
                self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.context_package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        if not self._ours(base):
            return
        for alias in node.names:
            if base == self.package and alias.name == "__version__":
                continue  # a constant of the light root: allowed anywhere
            submodule = f"{base}.{alias.name}"
            self._add(node, submodule if submodule in self.modules else base)


def import_graph(root: Path, package: str = PACKAGE) -> tuple[dict[str, Path], list[Import]]:
    """The modules of ``package`` under ``root`` and every import between them."""
    files = module_files(root, package)
    names = set(files)
    imports = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(root).as_posix()
        visitor = _Imports(name, path.name == "__init__.py", rel, names, package)
        visitor.visit(tree)
        imports.extend(visitor.found)
    return files, imports


def layer_of(module: str) -> tuple[int, str] | None:
    for rank, name, prefixes in LAYERS:
        for prefix in prefixes:
            exact = prefix.startswith("=")
            prefix = prefix.lstrip("=")
            if module == prefix or (not exact and module.startswith(prefix + ".")):
                return rank, name
    return None


def layer_violations(files: dict[str, Path], imports: list[Import], root: Path) -> list[str]:
    """Modules no layer covers, imports of modules that do not exist, and upward imports."""
    problems = [
        f"{path.relative_to(root).as_posix()}: {module} is in no layer (add it to LAYERS)"
        for module, path in files.items()
        if layer_of(module) is None
    ]
    for imp in sorted(imports, key=lambda i: (i.path, i.line, i.target)):
        if imp.target not in files:
            problems.append(f"{imp.at()}: {imp.describe()}, which is not a module of the package")
            continue
        source, target = layer_of(imp.importer), layer_of(imp.target)
        if source is None or target is None or target[0] <= source[0]:
            continue
        problems.append(
            f"{imp.at()}: {imp.describe()}: upward, from layer {source[0]} ({source[1]}) "
            f"to layer {target[0]} ({target[1]})"
        )
    return problems


def strongly_connected(nodes: list[str], edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(edges.get(start, ())))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, ()))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def import_cycles(files: dict[str, Path], imports: list[Import]) -> list[str]:
    """One readable cycle, the shortest through its first module, per set of modules that import
    each other, with every import inside that set (the ones to choose from to cut it)."""
    first: dict[tuple[str, str], Import] = {}
    for imp in sorted(imports, key=lambda i: (i.path, i.line)):
        if imp.target in files:
            first.setdefault((imp.importer, imp.target), imp)
    edges: dict[str, list[str]] = {}
    for importer, target in first:
        edges.setdefault(importer, []).append(target)
    reports = []
    for component in strongly_connected(sorted(files), edges):
        if len(component) < 2:
            continue
        members = set(component)
        start = component[0]
        # Breadth-first from start, inside the component, back to start: the shortest cycle.
        came_from: dict[str, str] = {}
        queue = deque([start])
        end = None
        while queue and end is None:
            node = queue.popleft()
            for child in sorted(edges.get(node, ())):
                if child not in members:
                    continue
                if child == start:
                    end = node
                    break
                if child not in came_from:
                    came_from[child] = node
                    queue.append(child)
        path = []
        node = end
        while node != start:
            path.append(node)
            node = came_from[node]
        chain = [start, *reversed(path), start]
        steps = [
            f"    {a} -> {b}  [{', '.join(filter(None, [first[a, b].at(), first[a, b].where]))}]"
            for a, b in itertools.pairwise(chain)
        ]
        inside = [
            f"    {imp.at()}: {imp.describe()}"
            for imp in sorted(imports, key=lambda i: (i.path, i.line))
            if imp.importer in members and imp.target in members
        ]
        reports.append(
            f"cycle among {', '.join(component)}:\n"
            + "\n".join(steps)
            + "\n  the imports inside it:\n"
            + "\n".join(inside)
        )
    return reports


def test_no_module_is_part_of_an_import_cycle():
    files, imports = import_graph(ROOT)
    cycles = import_cycles(files, imports)
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles), pytrace=False)


def test_imports_point_to_the_same_or_a_lower_layer():
    files, imports = import_graph(ROOT)
    problems = layer_violations(files, imports, ROOT)
    if problems:
        layers = "; ".join(f"{rank} {name}" for rank, name, _ in LAYERS)
        pytest.fail(
            f"{len(problems)} layering violation(s) (layers: {layers}):\n" + "\n".join(problems),
            pytrace=False,
        )


# In a fresh Python: import one module, and say whether torch came with it, which line of refq
# asked for it first, and which refq modules got imported.
_PROBE = """
import importlib, json, sys, traceback

class Watch:
    chain = None

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and Watch.chain is None:
            Watch.chain = [
                f"{frame.filename}:{frame.lineno}"
                for frame in traceback.extract_stack()
                if "importlib" not in frame.filename and frame.filename != "<string>"
            ]
        return None

sys.meta_path.insert(0, Watch())
module = importlib.import_module(sys.argv[1])
print(json.dumps({
    "torch": "torch" in sys.modules,
    "chain": Watch.chain,
    "ours": sorted(m for m in sys.modules if m == "refq_cli" or m.startswith("refq_cli.")),
    "version": getattr(module, "__version__", None) if sys.argv[1] == "refq_cli" else None,
}))
"""


def probe(module: str) -> dict:
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert result.returncode == 0, f"python -c 'import {module}' failed:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_light_packages_do_not_import_torch():
    heavy = []
    for package in LIGHT_PACKAGES:
        seen = probe(package)
        if seen["torch"]:
            chain = "\n".join(f"      {step}" for step in seen["chain"] or ["(not seen)"])
            heavy.append(f"  import {package} imports torch, asked for first from:\n{chain}")
    if heavy:
        pytest.fail(
            "packages that must stay light import torch:\n" + "\n".join(heavy), pytrace=False
        )


def test_the_package_root_is_a_light_home_for_the_version():
    seen = probe(PACKAGE)
    assert isinstance(seen["version"], str) and seen["version"]
    assert seen["ours"] == [PACKAGE], f"import refq_cli imports more of refq: {seen['ours']}"
    assert not seen["torch"]
    # What makes ``from refq_cli import __version__`` harmless from anywhere: the root imports
    # nothing of refq at module level (its lazy ``__getattr__`` imports run on demand only).
    _, imports = import_graph(ROOT)
    eager = [imp for imp in imports if imp.importer == PACKAGE and not imp.where]
    assert not eager, [f"{imp.at()}: {imp.describe()}" for imp in eager]


# The checker on packages made up for it: it must see what it is there to see.


def make_package(tmp_path: Path, modules: dict[str, str]) -> Path:
    for name, source in modules.items():
        path = tmp_path / (name.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return tmp_path


def test_the_checker_resolves_every_form_of_import(tmp_path):
    root = make_package(
        tmp_path,
        {
            "refq_cli.__init__": "__version__ = '1'\n",
            "refq_cli.errors": "",
            "refq_cli.io.__init__": "",
            "refq_cli.io.header": (
                "import os\n"
                "from refq_cli import __version__\n"
                "from refq_cli.io import digest\n"
                "from refq_cli.io import helper_name\n"
                "from . import digest as d2\n"
                "from .digest import sha\n"
                "from ..errors import E\n"
                "import refq_cli.errors\n"
                "def f():\n"
                "    from refq_cli.spec.spec import X\n"
                "if TYPE_CHECKING:\n"
                "    from refq_cli import load_artifact\n"
            ),
            "refq_cli.io.digest": "",
            "refq_cli.spec.__init__": "",
            "refq_cli.spec.spec": "",
        },
    )
    _, imports = import_graph(root)
    found = [(i.line, i.target, i.where) for i in imports if i.importer == "refq_cli.io.header"]
    assert found == [
        (3, "refq_cli.io.digest", ""),
        (4, "refq_cli.io", ""),
        (5, "refq_cli.io.digest", ""),
        (6, "refq_cli.io.digest", ""),
        (7, "refq_cli.errors", ""),
        (8, "refq_cli.errors", ""),
        (10, "refq_cli.spec.spec", "in f()"),
        (12, "refq_cli", "under TYPE_CHECKING"),
    ]


def test_the_checker_sees_upward_imports_and_unplaced_modules(tmp_path):
    root = make_package(
        tmp_path,
        {
            "refq_cli.__init__": "__version__ = '1'\n",
            "refq_cli.misc": "",
            "refq_cli.io.__init__": "",
            "refq_cli.io.header": (
                "from refq_cli import __version__\nfrom refq_cli.io import header\n"
                "def f():\n    import refq_cli.cli.app\n"
            ),
            "refq_cli.cli.__init__": "",
            "refq_cli.cli.app": "from refq_cli import io, misc\nimport refq_cli\n",
        },
    )
    files, imports = import_graph(root)
    assert layer_violations(files, imports, root) == [
        "refq_cli/misc.py: refq_cli.misc is in no layer (add it to LAYERS)",
        "refq_cli/cli/app.py:2: refq_cli.cli.app imports refq_cli: upward,"
        " from layer 7 (cli) to layer 8 (root)",
        "refq_cli/io/header.py:4: refq_cli.io.header imports refq_cli.cli.app (in f()): upward,"
        " from layer 1 (io) to layer 7 (cli)",
    ]


def test_the_checker_finds_cycles_through_lazy_imports(tmp_path):
    root = make_package(
        tmp_path,
        {
            "refq_cli.__init__": "",
            "refq_cli.pipeline.__init__": "",
            "refq_cli.pipeline.a": "from refq_cli.pipeline import b\n",
            "refq_cli.pipeline.b": "def f():\n    from refq_cli.pipeline.c import x\n",
            "refq_cli.pipeline.c": "import os\nfrom refq_cli.pipeline.a import y\n",
            "refq_cli.pipeline.d": "from refq_cli.pipeline import a\n",
        },
    )
    files, imports = import_graph(root)
    assert import_cycles(files, imports) == [
        "cycle among refq_cli.pipeline.a, refq_cli.pipeline.b, refq_cli.pipeline.c:\n"
        "    refq_cli.pipeline.a -> refq_cli.pipeline.b  [refq_cli/pipeline/a.py:1]\n"
        "    refq_cli.pipeline.b -> refq_cli.pipeline.c  [refq_cli/pipeline/b.py:2, in f()]\n"
        "    refq_cli.pipeline.c -> refq_cli.pipeline.a  [refq_cli/pipeline/c.py:2]\n"
        "  the imports inside it:\n"
        "    refq_cli/pipeline/a.py:1: refq_cli.pipeline.a imports refq_cli.pipeline.b\n"
        "    refq_cli/pipeline/b.py:2: refq_cli.pipeline.b imports refq_cli.pipeline.c (in f())\n"
        "    refq_cli/pipeline/c.py:2: refq_cli.pipeline.c imports refq_cli.pipeline.a"
    ]
