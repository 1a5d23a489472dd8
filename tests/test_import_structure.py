"""Import structure, read from the source with ``ast`` (nothing is imported).

pretrain: no import cycles between its modules; data knows no model, trainer or export code;
training and export do not import each other (both go through pretrain.checkpoint); no module
uses another module's private names. No source file is over 600 lines.

memopt: its modules import each other without cycles, it imports nothing from pretrain, and no
module uses a private (leading underscore) name that another module defines; neither does code
outside memopt (pretrain, tools, tests). Every import counts, also one inside a function: a lazy
import hides a cycle at import time but not the dependency.

The helpers (``import_graph``, ``find_cycles``, ``private_name_uses``) take any package directory,
so the same checks can be written for other packages.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMOPT = ROOT / "memopt"
OUTSIDE_MEMOPT = [ROOT / "pretrain", ROOT / "tools", ROOT / "tests"]


# -- helpers --------------------------------------------------------------------------------------
def module_files(package_dir: Path, package_name: str) -> dict[str, Path]:
    """{dotted module name: file} for every .py file under ``package_dir``."""
    out = {}
    for path in sorted(Path(package_dir).rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package_name, *parts])] = path
    return out


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of the module an ``ImportFrom`` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(path: Path, module: str, is_package: bool) -> set[str]:
    """Absolute names of everything ``path`` imports: modules, and for ``from m import x`` both
    ``m`` and ``m.x`` (``x`` may be a submodule; callers keep the names they know as modules)."""
    out = set()
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node)
            out.add(source)
            out.update(f"{source}.{alias.name}" for alias in node.names)
    return out


def import_graph(package_dir: Path, package_name: str) -> dict[str, set[str]]:
    """{module: the modules of the same package it imports}, every import statement counted.

    ``from pkg import sub`` is an edge to ``pkg.sub`` when that is a module of the package, and to
    ``pkg`` (its ``__init__``) only when it names something else, so the usual
    ``__init__`` re-exports do not read as cycles."""
    files = module_files(package_dir, package_name)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        names = imported_names(path, module, path.name == "__init__.py")
        edges = set()
        for name in names:
            if name in files and name != module:
                edges.add(name)
        # An edge to a package's __init__ only when no submodule of it explains the import.
        for pkg in {e for e in edges if files[e].name == "__init__.py"}:
            if any(n.startswith(pkg + ".") and n in files for n in names):
                if not _imports_non_module_from(path, module, pkg, files):
                    edges.discard(pkg)
        graph[module] = edges
    return graph


def _imports_non_module_from(path: Path, module: str, pkg: str, files: dict[str, Path]) -> bool:
    """True when ``path`` imports the package ``pkg`` itself or a name of it that is not a module."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import) and any(alias.name == pkg for alias in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and _resolve(module, is_package, node) == pkg:
            if any(f"{pkg}.{alias.name}" not in files for alias in node.names):
                return True
    return False


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: every strongly connected component with more than one
    module (or a module importing itself), each as a sorted list; [] when the graph is acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # Tarjan; import graphs are small, recursion depth is fine
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def defined_private_names(path: Path) -> set[str]:
    """Private names a file defines: module-level and class-level functions, classes and
    assignments, and attributes assigned on ``self``."""
    tree = _parse(path)
    out = set()
    scopes = [tree.body] + [n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    for body in scopes:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                out.update(t.id for t in targets if isinstance(t, ast.Name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                out.add(node.attr)
    return {n for n in out if _is_private(n)}


@dataclass(frozen=True)
class PrivateUse:
    path: Path
    line: int
    what: str

    def __str__(self):
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.what}"


def private_name_uses(path: Path, module: str, package_name: str, owners: dict[str, set[str]]) -> list[PrivateUse]:
    """Uses in ``path`` of private names that other modules of ``package_name`` define.

    ``owners``: {private name: modules defining it}. Flagged: ``from <package module> import _x``,
    and ``<expr>._x`` with ``_x`` defined elsewhere in the package and not in this file. Access
    through ``self``/``cls`` is not flagged: underscore hooks (``_update``, ``_init_state``) are
    the interface between a base class and its subclasses."""
    is_package = path.name == "__init__.py"
    own = defined_private_names(path)
    uses = []
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node)
            if source == package_name or source.startswith(package_name + "."):
                for alias in node.names:
                    if _is_private(alias.name) and source != module:
                        uses.append(PrivateUse(path, node.lineno, f"from {source} import {alias.name}"))
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                continue
            others = owners.get(node.attr, set()) - {module}
            if others and node.attr not in own:
                uses.append(PrivateUse(path, node.lineno, f".{node.attr} (defined in {', '.join(sorted(others))})"))
    return uses


def private_owners(package_dir: Path, package_name: str) -> dict[str, set[str]]:
    owners: dict[str, set[str]] = {}
    for module, path in module_files(package_dir, package_name).items():
        for name in defined_private_names(path):
            owners.setdefault(name, set()).add(module)
    return owners


# -- memopt ---------------------------------------------------------------------------------------
def test_memopt_has_no_import_cycles():
    graph = import_graph(MEMOPT, "memopt")
    assert "memopt.base" in graph and "memopt.sharding" in graph["memopt.base"]  # the graph is real
    assert find_cycles(graph) == []


def test_layouts_do_not_depend_on_optimizers():
    """memopt.sharding (layouts, the contract) and memopt.checkpoint see optimizers only
    through the ``LayoutOptimizer`` protocol."""
    graph = import_graph(MEMOPT, "memopt")
    assert graph["memopt.sharding"] == set()
    assert graph["memopt.checkpoint"] == {"memopt.sharding"}


def test_memopt_imports_nothing_from_pretrain():
    bad = []
    for module, path in module_files(MEMOPT, "memopt").items():
        names = imported_names(path, module, path.name == "__init__.py")
        bad += [f"{module}: {n}" for n in sorted(names) if n == "pretrain" or n.startswith("pretrain.")]
    assert bad == []


def test_no_memopt_module_uses_another_modules_private_names():
    owners = private_owners(MEMOPT, "memopt")
    uses = []
    for module, path in module_files(MEMOPT, "memopt").items():
        uses += private_name_uses(path, module, "memopt", owners)
    assert [str(u) for u in uses] == []


def test_code_outside_memopt_uses_no_memopt_private_names():
    owners = private_owners(MEMOPT, "memopt")
    uses = []
    for directory in OUTSIDE_MEMOPT:
        for module, path in module_files(directory, directory.name).items():
            uses += private_name_uses(path, module, "memopt", owners)
    assert [str(u) for u in uses] == []


# -- pretrain --------------------------------------------------------------------------------------
PRETRAIN = ROOT / "pretrain"


def _pretrain_edges(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    graph = import_graph(PRETRAIN, "pretrain")
    return [f"{m} -> {e}" for m, edges in sorted(graph.items()) if m.startswith(prefix)
            for e in sorted(edges) if e.startswith(forbidden)]


def test_pretrain_has_no_import_cycles():
    graph = import_graph(PRETRAIN, "pretrain")
    assert "pretrain.checkpoint" in graph["pretrain.train.trainer"]  # the graph is real
    assert find_cycles(graph) == []


def test_data_knows_no_model_trainer_or_export():
    assert _pretrain_edges("pretrain.data", ("pretrain.models", "pretrain.train", "pretrain.export",
                                             "pretrain.eval", "pretrain.checkpoint")) == []


def test_training_and_export_do_not_import_each_other():
    assert _pretrain_edges("pretrain.train", ("pretrain.export", "pretrain.eval")) == []
    assert _pretrain_edges("pretrain.export", ("pretrain.train",)) == []
    assert _pretrain_edges("pretrain.checkpoint", ("pretrain.train", "pretrain.export")) == []


def test_no_module_uses_another_pretrain_modules_private_names():
    owners = private_owners(PRETRAIN, "pretrain")
    uses = []
    for directory in (PRETRAIN, ROOT / "tools", ROOT / "tests", ROOT / "launch"):
        for module, path in module_files(directory, directory.name).items():
            uses += private_name_uses(path, module, "pretrain", owners)
    assert [str(u) for u in uses] == []


def test_no_source_file_is_over_600_lines():
    long = []
    for directory in (MEMOPT, PRETRAIN, ROOT / "tools", ROOT / "launch"):
        for path in sorted(directory.rglob("*.py")):
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > 600:
                long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert long == []


# -- the helpers themselves -------------------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root


def test_helpers_find_a_lazy_cycle_and_ignore_init_reexports(tmp_path):
    pkg = _write(tmp_path / "pkg", {
        "__init__.py": "from .a import A\nfrom . import b\n",
        "a.py": "from .b import B\nclass A: pass\n",
        "b.py": "def B():\n    from .a import A  # lazy, still a dependency\n    return A\n",
        "c.py": "from pkg import a\nimport pkg.b\n",
        "sub/__init__.py": "",
        "sub/d.py": "from .. import c\nfrom ..a import A\n",
    })
    graph = import_graph(pkg, "pkg")
    assert graph["pkg"] == {"pkg.a", "pkg.b"}
    assert graph["pkg.c"] == {"pkg.a", "pkg.b"}
    assert graph["pkg.sub.d"] == {"pkg.c", "pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b"]]
    assert find_cycles({"x": {"x"}, "y": set()}) == [["x"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []


def test_helpers_flag_private_names_across_modules(tmp_path):
    pkg = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "def _helper(): pass\nclass K:\n    def __init__(self):\n        self._state = 1\n"
                "    def _hook(self): pass\n",
        "b.py": "from .a import _helper, K\nfrom . import a\n"
                "class S(K):\n    def f(self):\n        return self._state, self._hook(), super()._hook()\n"
                "def g(k):\n    return k._state, a._helper, k.__class__\n",
    })
    owners = private_owners(pkg, "pkg")
    uses = private_name_uses(pkg / "b.py", "pkg.b", "pkg", owners)
    assert sorted(u.what for u in uses) == [
        "._helper (defined in pkg.a)", "._state (defined in pkg.a)", "from pkg.a import _helper",
    ]
    assert private_name_uses(pkg / "a.py", "pkg.a", "pkg", owners) == []
