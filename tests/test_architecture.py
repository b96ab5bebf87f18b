"""Architecture contracts: which layer may import what (an import-linter equivalent).

Every ``import`` in every module counts, including the ones inside functions. ``server/`` is
installed as ``edgehmoe.server`` (a package-dir mapping import-linter cannot follow), so the
import graph is read here with :mod:`ast`. Layers, top to bottom::

    edgehmoe.cli
    edgehmoe.server
    edgehmoe.fl
    edgehmoe.measure
    edgehmoe.export
    edgehmoe.model | edgehmoe.edge
    edgehmoe.data
    edgehmoe.core
    edgehmoe.errors

A module may import its own layer's package and any layer below it, never one above, and
siblings on one layer (``model`` and ``edge``) never import each other. ``measure`` sits above
``export`` because the inference bench writes a bundle to measure.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS = [
    ["edgehmoe.cli"],
    ["edgehmoe.server"],
    ["edgehmoe.fl"],
    ["edgehmoe.measure"],
    ["edgehmoe.export"],
    ["edgehmoe.model", "edgehmoe.edge"],
    ["edgehmoe.data"],
    ["edgehmoe.core"],
    ["edgehmoe.errors"],
]

# (importing package, forbidden top-level packages or edgehmoe packages)
FORBIDDEN = {
    "edgehmoe.core": ["torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "paho"],
    "edgehmoe.edge": ["torch", "torchvision", "onnx", "onnxscript", "paho"],
}
PAHO_OWNER = "edgehmoe.fl.mqtt"


def module_files() -> dict[str, Path]:
    out = {}
    for root, prefix in ((REPO / "edgehmoe", "edgehmoe"), (REPO / "server", "edgehmoe.server")):
        for f in root.rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = f
    return out


def imports_of(name: str, path: Path) -> set[str]:
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return found


GRAPH = {name: imports_of(name, path) for name, path in module_files().items()}


def layer_of(module: str) -> int | None:
    if module.endswith(".__main__"):  # `python -m` shims are entry points
        return 0
    for i, layer in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in layer):
            return i
    return None


def package_of(module: str) -> str | None:
    if module.endswith(".__main__"):
        return "edgehmoe.cli"
    for layer in LAYERS:
        for p in layer:
            if module == p or module.startswith(p + "."):
                return p
    return None


def test_graph_sees_every_layer():
    # Guards the test itself: a typo in LAYERS or a moved folder would make every check vacuous.
    seen = {package_of(m) for m in GRAPH}
    assert seen >= {p for layer in LAYERS for p in layer}
    assert "torch" in GRAPH["edgehmoe.model.training"] and "paho.mqtt.client" in GRAPH[PAHO_OWNER] | {
        i for i in GRAPH[PAHO_OWNER] if i.startswith("paho")
    }


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_layers_point_downwards(module):
    src_layer, src_pkg = layer_of(module), package_of(module)
    if src_layer is None:  # edgehmoe/__init__.py: version only
        return
    bad = []
    for imp in sorted(GRAPH[module]):
        if not imp.startswith("edgehmoe"):
            continue
        dst_layer, dst_pkg = layer_of(imp), package_of(imp)
        if dst_layer is None or dst_pkg == src_pkg:
            continue
        if dst_layer <= src_layer:
            bad.append(imp)
    assert not bad, f"{module} imports {bad} from its own or a higher layer (see the layer list in this file)"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_forbidden_imports(module):
    pkg = package_of(module)
    forbidden = list(FORBIDDEN.get(pkg, []))
    if module != PAHO_OWNER:
        forbidden.append("paho")
    bad = sorted(i for i in GRAPH[module] if any(i == f or i.startswith(f + ".") for f in forbidden))
    assert not bad, f"{module} must not import {bad}"


def test_no_import_cycles():
    # Edges between our own modules only; `from pkg import name` counts when name is a module.
    edges = {m: {i for i in imps if i in GRAPH and i != m} for m, imps in GRAPH.items()}
    # A package's __init__ re-exporting its submodules is not a cycle with them.
    edges = {m: {i for i in dst if not m.startswith(i + ".")} for m, dst in edges.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles[:5]}"
