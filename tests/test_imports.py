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
    module, else X, and the packages above it that importing it runs (not ``fastitm`` itself: Python
    runs it first in any case)."""
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
                    graph[name].update(_runs(sub if sub in mods else target, name, mods))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    graph[name].update(_runs(alias.name, name, mods))
    return graph


def _runs(target: str, importer: str, mods) -> set[str]:
    """What importing ``target`` from ``importer`` runs: the module and each package above it that is
    not above the importer too (``from fastitm.finetune.x import y`` runs ``fastitm/finetune/__init__``)."""
    parts = target.split(".")
    above = {".".join(parts[:k]) for k in range(2, len(parts))}
    out = {target} | {m for m in above if not importer.startswith(m + ".")}
    return {m for m in out if m in mods and m != importer}


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
    # importing a submodule runs the packages above it, except the importer's own
    mods = modules()
    assert _runs("fastitm.finetune.loop", "fastitm.models.model", mods) == {"fastitm.finetune.loop", "fastitm.finetune"}
    assert _runs("fastitm.engine.racing", "fastitm.engine.common", mods) == {"fastitm.engine.racing"}
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


# The layers, bottom up: a module imports only from its own layer or those below (each subpackage's
# docstring says the same in words).
LAYERS = [
    ("fastitm._C", "fastitm._version", "fastitm._user", "fastitm._moved", "fastitm.data", "fastitm.ops"),
    ("fastitm.core",),
    ("fastitm.models",),
    ("fastitm.engine",),
    ("fastitm.api", "fastitm.reference", "fastitm.testing"),
    ("fastitm.evaluate",),
    ("fastitm.finetune",),
    ("fastitm.scorer", "fastitm.train", "fastitm.cli", "fastitm.demo", "fastitm.__main__"),
]
# Arrows that run up on purpose, each with its reason.
UPWARD: set[tuple[str, str]] = set()


def layer(module: str) -> int:
    if module == "fastitm":
        return len(LAYERS) - 1  # the face gathers the public names of every layer, beside the surfaces
    for n, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return n
    raise AssertionError(f"{module} is in no layer of tests/test_imports.py: place it")


def test_every_import_runs_down_the_layers():
    graph = import_graph()
    up = sorted((a, b) for a, deps in graph.items() for b in deps if layer(b) > layer(a) and (a, b) not in UPWARD)
    assert not up, "imports that run up the layers: " + "; ".join(f"{a} -> {b}" for a, b in up)


def test_the_paths_from_before_the_layers_import_the_moved_modules():
    """In a fresh interpreter: each old path is the new module itself (patching one patches both) and
    warns naming the new path."""
    import json
    import subprocess
    import sys

    code = """
import importlib, json, warnings
from fastitm._moved import MOVED
out = {}
for old, new in sorted(MOVED.items()):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    out[old] = [module is importlib.import_module(new),
                [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]]
print(json.dumps(out))
"""
    got = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    cwd=PACKAGE.parent).stdout)
    from fastitm._moved import MOVED

    assert set(got) == set(MOVED) and len(got) >= 20
    for old, (same, said) in got.items():
        assert same, old
        assert any(MOVED[old] in m for m in said), (old, said)
