"""The package's shape, checked from its source: no import circles, nothing imported upward, no private
names borrowed across modules (issue #11). Imports inside functions count too: a lazy import is still a
dependency. The checks read the files with `ast`; nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parent.parent / "qcard"

# Layers, lowest first. A module may import its own layer and the layers below it, never above.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("foundation", ("qcard.errors", "qcard.yamlio", "qcard.registry", "qcard.version", "qcard.records",
                    "qcard.provenance", "qcard.scheme", "qcard.stats")),
    ("sources", ("qcard.data", "qcard.zoo", "qcard.evaluate")),
    ("tracing", ("qcard.ops",)),
    # zoo.train retrains the bundled models through the shared training loop: it sits with the loop
    # deploy exports a simulated model (quant's quantizers) and runs it on a real runtime
    ("engine", ("qcard.quant", "qcard.cost", "qcard.training", "qcard.checkpoint", "qcard.zoo.train", "qcard.deploy")),
    ("cards", ("qcard.cards", "qcard.site")),   # site: a gallery of rendered cards and comparisons
    ("methods", ("qcard.methods",)),
    ("orchestration", ("qcard.config", "qcard.store", "qcard.runner", "qcard.executors", "qcard.verify",
                       "qcard.planning")),
    ("cli", ("qcard.cli", "qcard.commands", "qcard")),    # "qcard": the package's own __init__ only
]


def _modules() -> Dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(mod: str) -> List[Tuple[str, List[str], int]]:
    """(imported module, imported names, line) for every import of qcard code in `mod`."""
    path = MODULES[mod]
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "qcard" or target.startswith("qcard."):
                out.append((target, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "qcard"]
    return out


def _edges() -> Dict[str, Set[str]]:
    edges: Dict[str, Set[str]] = {m: set() for m in MODULES}
    for mod in MODULES:
        for target, names, _ in _imports(mod):
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]   # `from pkg import module`
            for t in hits or [target]:
                if t in MODULES and t != mod:
                    edges[mod].add(t)
    return edges


def _layer(mod: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or (mod.startswith(p + ".") and p != "qcard")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"module {mod} is in no layer of tests/test_architecture.py: add it"
    return rank


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    cycles = _cycles(_edges())
    assert not cycles, "import circles in qcard/: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_nothing_imports_upward():
    bad = []
    for mod in MODULES:
        for target, names, line in _imports(mod):
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES] or [target]
            for t in hits:
                if t in MODULES and _layer(t) > _layer(mod):
                    bad.append(f"{MODULES[mod].relative_to(PACKAGE.parent)}:{line} {mod} ({LAYERS[_layer(mod)][0]}) "
                               f"imports {t} ({LAYERS[_layer(t)][0]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for mod in MODULES:
        for target, names, line in _imports(mod):
            if target == mod:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in MODULES:
                    bad.append(f"{MODULES[mod].relative_to(PACKAGE.parent)}:{line} imports {target}.{n}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_the_checks_can_fail():
    """The cycle finder finds a planted circle and the layers order what they should (a test that cannot
    fail proves nothing)."""
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(planted) == [["a", "b", "c"]]
    assert _layer("qcard.quant.graph") < _layer("qcard.methods.sparq.method") < _layer("qcard.runner")
    assert _layer("qcard.cards.render") < _layer("qcard.methods.base") and _layer("qcard") == len(LAYERS) - 1
