"""The package's import graph, read from its source with ``ast``: no module imports itself through
others (at module level or inside a function), so no circle comes back."""

import ast
from pathlib import Path

import fastitm

PACKAGE = Path(fastitm.__file__).parent


def modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, whether it is a package's __init__); the compiled extension counts as
    ``fastitm._C`` (it imports nothing of ours)."""
    out = {"fastitm._C": (None, False)}
    for f in PACKAGE.rglob("*.py"):
        parts = ["fastitm", *f.relative_to(PACKAGE).with_suffix("").parts]
        pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if pkg else parts)] = (f, pkg)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the modules it imports anywhere in its file. ``from X import a``: X.a when that is a
    module, else X; a package's parent is not counted (Python runs it first in any case)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, (f, pkg) in mods.items():
        graph[name] = set()
        if f is None:
            continue
        here = name.split(".") if pkg else name.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    dep = sub if sub in mods else target
                    if dep in mods and dep != name:
                        graph[name].add(dep)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods and alias.name != name:
                        graph[name].add(alias.name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_imports_at_every_level():
    graph = import_graph()
    # module level, inside a function, a submodule named in "from . import x", the extension
    assert "fastitm.api" in graph["fastitm"]
    assert "fastitm._version" in graph["fastitm.evaluate.report"]
    assert "fastitm._C" in graph["fastitm.ops._backend"]
    # and a circle made up here is found
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_only_the_surfaces_import_the_package_face():
    """``fastitm/__init__`` gathers the public names; a module below it imports what it needs from
    where it lives, so the face can import everything without a circle."""
    graph = import_graph()
    users = sorted(m for m, deps in graph.items() if "fastitm" in deps)
    assert users == ["fastitm.cli", "fastitm.demo"]
