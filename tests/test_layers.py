"""No import circles in modelbuild (issue #22), found from the code's own imports.

The graph is built with ``ast`` over every ``modelbuild/**/*.py``, not by importing anything, so
an import a run never reaches (inside a function, behind a flag) counts as much as one at the top:
a circle through a function-level import is still a circle, it only waits for the call.

The modules: every .py file under modelbuild/ whose folders all have an ``__init__.py`` (so not
``templates/project/dodo.py``, package data that ``init`` copies into a project).

What counts as an edge from module A to module B (both in modelbuild):

- ``import modelbuild.x.y`` (with or without ``as``): A -> modelbuild.x.y;
- ``from P import n`` (``P`` absolute, or relative: ``.``, ``..x``, resolved against A's
  package): A -> P.n where ``P.n`` is a module (a file or a package), else A -> P, since ``n``
  is then a name that P (a module, or a package's ``__init__.py``) defines;
- imports anywhere in the file: top level, functions, methods, ``try``/``else`` branches;
- but not under ``if TYPE_CHECKING:`` (nor ``if typing.TYPE_CHECKING:``): those never run. Its
  ``else:`` branch does count.

Parent packages: importing ``modelbuild.ml.gptq`` also runs ``modelbuild/__init__.py`` and
``modelbuild/ml/__init__.py`` first. That implicit step is *not* an edge: every module below a
package would otherwise depend on its ``__init__``, and any ``__init__`` that imports one of its
own submodules would be a circle, which it is not (Python runs the ``__init__`` to the import,
then the submodule, whose parents are already in ``sys.modules``). An edge to a package's
``__init__`` is counted only when the import names the package itself: ``from modelbuild import
UserError`` or ``import modelbuild.olive`` is an edge to that ``__init__``; ``from modelbuild.ml
import gptq`` is an edge to ``modelbuild.ml.gptq`` alone.

Circles are the strongly connected components of that graph (Tarjan's algorithm, iterative).
Each is printed as chains ``a -> b -> a``, one shortest circle through each of its modules, with
the file:line of every import edge inside the component.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

PACKAGE = "modelbuild"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# The layers, bottom -> top (issue #22): a package per layer under modelbuild/, and the two
# modules users import by name (passdef: third-party passes; tasks: dodo.py) kept at the top.
# A module may import from its own layer or below.
LAYERS = {
    "core": ["core", "passdef", "__init__"],
    "graph": ["graph"],
    "cache": ["cache"],
    "exec": ["exec"],
    "engine": ["engine"],
    "ml": ["ml"],
    "passes": ["passes"],
    "olive": ["olive"],
    "cli": ["cli", "tasks", "__main__"],
}


# --- the graph -------------------------------------------------------------------------------

def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``root`` (a package's is its __init__.py)
    whose folders are all packages: not package data such as templates/project/dodo.py."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        if any(not (folder / "__init__.py").is_file() for folder in [path.parent, *path.parent.parents]
               if folder.is_relative_to(root)):
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node that can run: all but those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, dict[str, list[tuple[str, int]]]]:
    """module -> {imported module -> [(file, line), ...]}, modelbuild modules only (rules: docstring)."""
    modules = module_files(root, package)
    graph: dict[str, dict[str, list[tuple[str, int]]]] = {name: {} for name in modules}
    base = root.parent
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        where = str(path.relative_to(base))

        def edge(target: str, line: int) -> None:
            if target in modules:
                places = graph[name].setdefault(target, [])
                if (where, line) not in places:
                    places.append((where, line))
                    places.sort(key=lambda place: place[1])

        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edge(alias.name, node.lineno)
                continue
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                source = ".".join(parts + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                edge(submodule if submodule in modules else source, node.lineno)
    return graph


# --- circles ---------------------------------------------------------------------------------

def strongly_connected(graph: dict[str, object]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively; those that are circles only (more
    than one module, or a module importing itself), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in graph:
                    continue
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))
    return sorted(found)


def circles(graph: dict[str, object], component: list[str]) -> list[list[str]]:
    """One shortest circle through each module of ``component`` (breadth-first inside it), each
    as a chain starting and ending at its smallest module, without repeats."""
    members = set(component)
    chains: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for start in component:
        parent: dict[str, str] = {}
        queue = deque([start])
        closing = None
        while queue and closing is None:
            node = queue.popleft()
            for succ in sorted(graph[node]):
                if succ == start:
                    closing = node
                    break
                if succ in members and succ not in parent:
                    parent[succ] = node
                    queue.append(succ)
        path = [closing]
        while path[-1] != start:
            path.append(parent[path[-1]])
        loop = path[::-1]
        first = loop.index(min(loop))
        loop = loop[first:] + loop[:first]
        if tuple(loop) not in seen:
            seen.add(tuple(loop))
            chains.append(loop + [loop[0]])
    return sorted(chains, key=lambda c: (len(c), c))


def _short(name: str) -> str:
    return name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + ".") else name


def describe(graph: dict[str, dict[str, list[tuple[str, int]]]], components: list[list[str]]) -> str:
    """Each circle as readable chains, then the import lines that make it."""
    lines = []
    for component in components:
        lines.append(f"circle among {', '.join(_short(m) for m in component)}:")
        for chain in circles(graph, component):
            lines.append("  " + " -> ".join(_short(m) for m in chain))
        for a in component:
            for b in sorted(graph[a]):
                if b in component:
                    places = ", ".join(f"{file}:{line}" for file, line in graph[a][b])
                    lines.append(f"    {_short(a)} -> {_short(b)}  ({places})")
    return "\n".join(lines)


# --- layers ----------------------------------------------------------------------------------

def layer_of(module: str) -> int | None:
    rest = _short(module) if module != PACKAGE else "__init__"
    top = rest.split(".")[0]
    for rank, names in enumerate(LAYERS.values()):
        if top in names:
            return rank
    return None


def upward_imports(graph: dict[str, dict[str, list[tuple[str, int]]]]) -> list[str]:
    """Every import from a lower layer to a higher one, as 'file:line a (layer) -> b (layer)'."""
    names = list(LAYERS)
    found = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            la, lb = layer_of(a), layer_of(b)
            if la is not None and lb is not None and lb > la:
                for file, line in graph[a][b]:
                    found.append(f"{file}:{line}  {_short(a) or PACKAGE} ({names[la]}) -> {_short(b)} ({names[lb]})")
    return found


# --- tests -----------------------------------------------------------------------------------

def test_no_import_circles():
    graph = import_graph()
    components = strongly_connected(graph)
    assert not components, "import circles in modelbuild:\n" + describe(graph, components)


def test_every_module_has_a_layer():
    unplaced = [m for m in import_graph() if layer_of(m) is None]
    assert not unplaced, f"modules with no layer in tests/test_layers.py LAYERS: {unplaced}"


def test_no_upward_imports():
    upward = upward_imports(import_graph())
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_the_folders_show_the_layers():
    """Beside its layer packages, modelbuild/ keeps only the modules users and Python import by
    name: the package itself, ``python -m modelbuild``, passdef (passes) and tasks (dodo.py)."""
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "passdef.py", "tasks.py"], top
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == sorted(LAYERS.keys()), packages


# What may live at module level beside constants: state of the Python environment, not of a run
# (core/run.py says why), and the one project a doit process loaded (dodo.py asks for it twice).
PROCESS_WIDE = {("modelbuild.passdef", "_entries"), ("modelbuild.passdef", "_loaded"),
                ("modelbuild.core.key", "_library_versions"), ("modelbuild.tasks", "_loaded")}
CONTAINERS = ("dict", "list", "set", "defaultdict", "OrderedDict", "deque")


def module_state(root: Path = ROOT, package: str = PACKAGE) -> list[tuple[str, str, int]]:
    """(module, name, line) of each module-level name that holds state a run could change: a
    mutable container, a name assigned None to be filled later, or a ``global`` statement.
    ALL_CAPS names are constants by convention and left out."""
    found = []
    for module, path in module_files(root, package).items():
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            value = getattr(node, "value", None)
            mutable = isinstance(value, (ast.Dict, ast.List, ast.Set)) or (
                isinstance(value, ast.Constant) and value.value is None) or (
                isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", "")) in CONTAINERS)
            found += [(module, t.id, node.lineno) for t in targets
                      if isinstance(t, ast.Name) and not t.id.isupper() and mutable]
        found += [(module, name, node.lineno) for node in ast.walk(tree) if isinstance(node, ast.Global)
                  for name in node.names]
    return sorted(set(found))


def test_no_module_holds_run_state():
    """What a run learns lives in its Run (core/run.py), passed with the project; a new
    module-level cache would be a hidden run object again."""
    hidden = [f"{module}.{name} (line {line})" for module, name, line in module_state()
              if (module, name) not in PROCESS_WIDE]
    assert not hidden, "module-level state outside core/run.py's Run:\n" + "\n".join(hidden)


def test_module_state_finder_can_fail(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("LIMIT = {}\n")
    (pkg / "a.py").write_text("_seen: dict = {}\nlast = None\npools = dict()\nname = 'x'\n"
                              "def f():\n    global last\n    last = 1\n")
    assert module_state(pkg, "pkg") == [("pkg.a", "_seen", 1), ("pkg.a", "last", 2), ("pkg.a", "last", 6),
                                        ("pkg.a", "pools", 3)]


def test_finder_sees_a_known_circle():
    """The finder can fail: a synthetic graph with known circles, and one without."""
    graph = {"a": {"b": []}, "b": {"c": []}, "c": {"a": [], "d": []}, "d": {}, "e": {"e": []},
             "f": {"a": [], "g": []}, "g": {"f": []}}
    assert strongly_connected(graph) == [["a", "b", "c"], ["e"], ["f", "g"]]
    assert circles(graph, ["a", "b", "c"]) == [["a", "b", "c", "a"]]
    assert strongly_connected({"a": {"b": []}, "b": {"c": []}, "c": {}}) == []
    text = describe({"m.a": {"m.b": [("m/a.py", 3)]}, "m.b": {"m.a": [("m/b.py", 7)]}}, [["m.a", "m.b"]])
    assert "m.a -> m.b -> m.a" in text and "m/a.py:3" in text and "m/b.py:7" in text


def test_graph_follows_the_rules(tmp_path):
    """Relative and absolute imports, a name vs a submodule, function-level and TYPE_CHECKING."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nfrom . import X\nif TYPE_CHECKING:\n"
                              "    from . import c\nelse:\n    import pkg.sub\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import d\n")
    (pkg / "c.py").write_text("import os\nfrom pkg.sub.d import y\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text("from .. import b\nfrom ..a import something\n")
    (pkg / "data").mkdir()
    (pkg / "data" / "template.py").write_text("import pkg.a\n")  # package data, not a module
    graph = import_graph(pkg, "pkg")
    edges = {a: sorted(b) for a, b in graph.items()}
    assert edges == {"pkg": [], "pkg.a": ["pkg", "pkg.sub"], "pkg.b": ["pkg.sub.d"], "pkg.c": ["pkg.sub.d"],
                     "pkg.sub": [], "pkg.sub.d": ["pkg.a", "pkg.b"]}
    assert graph["pkg.b"]["pkg.sub.d"] == [("pkg/b.py", 2)]
    assert strongly_connected(graph) == [["pkg.b", "pkg.sub.d"]]


if __name__ == "__main__":
    g = import_graph()
    print(describe(g, strongly_connected(g)) or "no circles")
    print("\nupward imports:")
    print("\n".join(upward_imports(g)) or "none")
